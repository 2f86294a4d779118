import { UsageError } from '../errors.ts';
import type { GgmlType } from './ggml-types.ts';

/**
 * The GGUF container as Orchard sees it: a header of typed key/value metadata and tensor infos,
 * followed by an aligned data section. Format reference: `ggml/include/gguf.h` and
 * `ggml/src/gguf.cpp` in llama.cpp (the loader whose rules the reader mirrors).
 */

export const GGUF_MAGIC = 0x46554747; // "GGUF" read as a little-endian u32
export const GGUF_DEFAULT_ALIGNMENT = 32;
export const GGUF_ALIGNMENT_KEY = 'general.alignment';
/** ggml's GGML_MAX_NAME: tensor names must be shorter than this many bytes (NUL included). */
export const GGML_MAX_NAME = 64;
export const GGML_MAX_DIMS = 4;

/** Value type ids of GGUF metadata (`enum gguf_type`). */
export const GGUF_VALUE_TYPES = [
  'uint8',
  'int8',
  'uint16',
  'int16',
  'uint32',
  'int32',
  'float32',
  'bool',
  'string',
  'array',
  'uint64',
  'int64',
  'float64',
] as const;

export type GgufValueType = (typeof GGUF_VALUE_TYPES)[number];
export type GgufScalarType = Exclude<GgufValueType, 'array'>;
export type GgufNumberType = 'uint8' | 'int8' | 'uint16' | 'int16' | 'uint32' | 'int32' | 'float32' | 'float64';
export type GgufBigIntType = 'uint64' | 'int64';

export function ggufValueTypeId(type: GgufValueType): number {
  return GGUF_VALUE_TYPES.indexOf(type);
}

/**
 * A metadata value with its wire type kept, so a file can be read and written back unchanged.
 * 64-bit integers are bigints (GGUF uses them for sizes that can exceed 2^53).
 */
export type GgufValue =
  | { readonly type: GgufNumberType; readonly value: number }
  | { readonly type: GgufBigIntType; readonly value: bigint }
  | { readonly type: 'bool'; readonly value: boolean }
  | { readonly type: 'string'; readonly value: string }
  | GgufArrayValue;

export type GgufArrayValue =
  | { readonly type: 'array'; readonly itemType: GgufNumberType; readonly value: readonly number[] }
  | { readonly type: 'array'; readonly itemType: GgufBigIntType; readonly value: readonly bigint[] }
  | { readonly type: 'array'; readonly itemType: 'bool'; readonly value: readonly boolean[] }
  | { readonly type: 'array'; readonly itemType: 'string'; readonly value: readonly string[] };

/** One tensor as the header describes it (no data). */
export interface GgufTensorInfo {
  readonly name: string;
  /** ggml order: dims[0] is the contiguous row length (ne0). */
  readonly dims: readonly number[];
  readonly type: GgmlType;
  /** Offset of the data relative to `dataOffset`. */
  readonly offset: number;
  /** Bytes of data (ggml_nbytes), without alignment padding. */
  readonly bytes: number;
}

export interface GgufHeader {
  readonly version: 2 | 3;
  /** Insertion-ordered; a Map so hostile keys like `__proto__` stay plain data. */
  readonly metadata: ReadonlyMap<string, GgufValue>;
  readonly tensors: readonly GgufTensorInfo[];
  readonly alignment: number;
  /** File offset where the data section starts (aligned). */
  readonly dataOffset: number;
  /** Bytes of the data section the tensor infos describe, alignment padding included. */
  readonly dataSize: number;
}

/** Build typed values tersely: `gv.u32(4096)`, `gv.str('llama')`, `gv.arr('float32', [..])`. */
export const gv = {
  u8: (value: number): GgufValue => ({ type: 'uint8', value }),
  i8: (value: number): GgufValue => ({ type: 'int8', value }),
  u16: (value: number): GgufValue => ({ type: 'uint16', value }),
  i16: (value: number): GgufValue => ({ type: 'int16', value }),
  u32: (value: number): GgufValue => ({ type: 'uint32', value }),
  i32: (value: number): GgufValue => ({ type: 'int32', value }),
  f32: (value: number): GgufValue => ({ type: 'float32', value }),
  f64: (value: number): GgufValue => ({ type: 'float64', value }),
  u64: (value: bigint | number): GgufValue => ({ type: 'uint64', value: BigInt(value) }),
  i64: (value: bigint | number): GgufValue => ({ type: 'int64', value: BigInt(value) }),
  bool: (value: boolean): GgufValue => ({ type: 'bool', value }),
  str: (value: string): GgufValue => ({ type: 'string', value }),
  arr: ((itemType: GgufScalarType, value: readonly unknown[]) => ({ type: 'array', itemType, value })) as {
    (itemType: GgufNumberType, value: readonly number[]): GgufValue;
    (itemType: GgufBigIntType, value: readonly bigint[]): GgufValue;
    (itemType: 'bool', value: readonly boolean[]): GgufValue;
    (itemType: 'string', value: readonly string[]): GgufValue;
  },
};

/** A number-valued key (any integer or float type; 64-bit ints must fit 2^53), or undefined. */
export function metaNumber(header: Pick<GgufHeader, 'metadata'>, key: string): number | undefined {
  const v = header.metadata.get(key);
  if (!v) return undefined;
  if (v.type === 'uint64' || v.type === 'int64') {
    const n = Number(v.value);
    if (!Number.isSafeInteger(n)) throw new UsageError(`GGUF key ${key} = ${v.value} is out of range`);
    return n;
  }
  if (v.type === 'string' || v.type === 'array' || v.type === 'bool') {
    throw new UsageError(`GGUF key ${key} should be a number but is ${v.type}`);
  }
  return v.value as number;
}

/** A string-valued key, or undefined. */
export function metaString(header: Pick<GgufHeader, 'metadata'>, key: string): string | undefined {
  const v = header.metadata.get(key);
  if (!v) return undefined;
  if (v.type !== 'string') throw new UsageError(`GGUF key ${key} should be a string but is ${v.type}`);
  return v.value;
}

/** An array-valued key, or undefined. */
export function metaArray(header: Pick<GgufHeader, 'metadata'>, key: string): GgufArrayValue | undefined {
  const v = header.metadata.get(key);
  if (!v) return undefined;
  if (v.type !== 'array') throw new UsageError(`GGUF key ${key} should be an array but is ${v.type}`);
  return v;
}

export function alignUp(n: number, alignment: number): number {
  return Math.ceil(n / alignment) * alignment;
}
