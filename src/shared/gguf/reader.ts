import { constants } from 'node:fs';
import { open, stat } from 'node:fs/promises';
import { UsageError, errorMessage } from '../errors.ts';
import { type GgmlType, ggmlTypeById, removedGgmlTypeName } from './ggml-types.ts';
import {
  GGML_MAX_DIMS,
  GGML_MAX_NAME,
  GGUF_ALIGNMENT_KEY,
  GGUF_DEFAULT_ALIGNMENT,
  GGUF_MAGIC,
  GGUF_VALUE_TYPES,
  type GgufHeader,
  type GgufScalarType,
  type GgufTensorInfo,
  type GgufValue,
  alignUp,
} from './types.ts';

/**
 * GGUF header reader. The rules mirror llama.cpp's loader (`ggml/src/gguf.cpp`), so a file this
 * reader accepts is one llama.cpp would accept, and a file it rejects gets one clear line saying
 * why. Every length and count read from the file is checked against the bytes that remain
 * before anything is allocated, and the JavaScript values decoded from the header may take at
 * most DECODED_PER_WIRE_BYTE times the header's own bytes (plus a fixed slack), so hostile input
 * cannot make it crash, hang or allocate more than a small multiple of the input size.
 */

/** A malformed or unsupported GGUF file (exit 2: bad input file). */
export class GgufError extends UsageError {
  override readonly name: string = 'GgufError';
}

/** Limits of gguf.cpp (GGUF_MAX_STRING_LENGTH, GGUF_MAX_ARRAY_ELEMENTS). */
const MAX_STRING_BYTES = 1024 * 1024 * 1024;
const MAX_ARRAY_ELEMENTS = 1024 * 1024 * 1024;
/** Smallest encodings, used to refuse counts that cannot fit in the remaining bytes. */
const MIN_KV_BYTES = 8 + 1 + 4 + 1; // key length, 1-byte key, type, 1-byte value
const MIN_TENSOR_INFO_BYTES = 8 + 1 + 4 + 4 + 8; // name length, 1-byte name, n_dims=0, type, offset

/**
 * Memory bound of the decoded header: JS heap bytes per header byte read. A JS array holds 8
 * bytes per element whatever the wire type, so without it a header of uint8 or bool arrays
 * would grow eightfold (a 512 MiB header, GBs of arrays). Strings, int32 and float32 arrays
 * (a real vocabulary) stay under 4x; the slack covers small byte arrays such as a
 * sentencepiece `precompiled_charsmap`.
 */
const DECODED_PER_WIRE_BYTE = 4;
const DECODED_SLACK_BYTES = 16 * 1024 * 1024;
/** Estimated V8 heap bytes of one decoded element (the array slot included). */
const JS_BYTES_PER_ITEM: Record<GgufScalarType, number> = {
  uint8: 8,
  int8: 8,
  uint16: 8,
  int16: 8,
  uint32: 8,
  int32: 8,
  float32: 8,
  float64: 8,
  bool: 8,
  uint64: 32, // a heap BigInt and its slot
  int64: 32,
  string: 32, // a heap string header and its slot; its characters are counted as read
};

const SCALAR_SIZE: Record<GgufScalarType, number> = {
  uint8: 1,
  int8: 1,
  uint16: 2,
  int16: 2,
  uint32: 4,
  int32: 4,
  float32: 4,
  bool: 1,
  string: 8, // the length prefix; the bytes come on top
  uint64: 8,
  int64: 8,
  float64: 8,
};

/** Thrown inside the parser when a file prefix ends too soon; the file reader reads more. */
class NeedMoreBytes extends Error {
  constructor(readonly needed: number) {
    super(`need ${needed} bytes`);
  }
}

const DECODER = new TextDecoder('utf-8');

class Cursor {
  pos = 0;
  /** Estimated JS heap bytes of the values decoded so far. */
  private decoded = 0;
  private readonly buf: Buffer;

  constructor(
    bytes: Uint8Array,
    /** Size of the whole file `bytes` is a prefix of. */
    readonly fileSize: number,
  ) {
    this.buf = Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  }

  get remaining(): number {
    return this.fileSize - this.pos;
  }

  need(n: number, what: string): void {
    if (n > this.fileSize - this.pos) {
      throw new GgufError(
        `not a valid GGUF file: truncated: ${what} at offset ${this.pos} needs ${n} bytes but only ${Math.max(0, this.fileSize - this.pos)} remain`,
      );
    }
    if (this.pos + n > this.buf.length) throw new NeedMoreBytes(this.pos + n);
  }

  /**
   * Account for `jsBytes` of decoded values whose encoding ends `wireBytes` from here, refusing
   * before anything is allocated when they would outgrow the memory bound.
   */
  charge(jsBytes: number, wireBytes: number, what: string): void {
    const allowed = DECODED_PER_WIRE_BYTE * (this.pos + wireBytes) + DECODED_SLACK_BYTES;
    if (this.decoded + jsBytes > allowed) {
      throw new GgufError(
        `not a valid GGUF file: ${what} would take about ${this.decoded + jsBytes} bytes of memory, more than ${DECODED_PER_WIRE_BYTE} times the ${this.pos + wireBytes} header bytes that encode it`,
      );
    }
    this.decoded += jsBytes;
  }

  u8(): number {
    return this.buf.readUInt8(this.pos++);
  }
  u32(what: string): number {
    this.need(4, what);
    const v = this.buf.readUInt32LE(this.pos);
    this.pos += 4;
    return v;
  }
  u64(what: string): bigint {
    this.need(8, what);
    const v = this.buf.readBigUInt64LE(this.pos);
    this.pos += 8;
    return v;
  }

  /** A GGUF string: u64 length + UTF-8 bytes (invalid sequences become U+FFFD). */
  str(what: string, maxBytes = MAX_STRING_BYTES): string {
    const len = this.u64(`${what} length`);
    if (len > BigInt(maxBytes)) throw new GgufError(`not a valid GGUF file: ${what} length ${len} exceeds the maximum ${maxBytes}`);
    const n = Number(len);
    this.need(n, what);
    this.charge(2 * n, n, what); // at most two bytes per UTF-16 code unit, one unit per byte
    const s = DECODER.decode(this.buf.subarray(this.pos, this.pos + n));
    this.pos += n;
    return s;
  }

  /** Read `count` scalars of one type; caller has checked the count against the remaining bytes. */
  scalars(type: GgufScalarType, count: number, what: string): unknown[] {
    this.charge(JS_BYTES_PER_ITEM[type] * count, SCALAR_SIZE[type] * count, what);
    if (type === 'string') {
      const out: string[] = new Array(count);
      for (let i = 0; i < count; i++) out[i] = this.str(what);
      return out;
    }
    const size = SCALAR_SIZE[type];
    this.need(size * count, what);
    const b = this.buf;
    let p = this.pos;
    const out: unknown[] = new Array(count);
    for (let i = 0; i < count; i++, p += size) {
      switch (type) {
        case 'uint8':
          out[i] = b.readUInt8(p);
          break;
        case 'int8':
          out[i] = b.readInt8(p);
          break;
        case 'uint16':
          out[i] = b.readUInt16LE(p);
          break;
        case 'int16':
          out[i] = b.readInt16LE(p);
          break;
        case 'uint32':
          out[i] = b.readUInt32LE(p);
          break;
        case 'int32':
          out[i] = b.readInt32LE(p);
          break;
        case 'float32':
          out[i] = b.readFloatLE(p);
          break;
        case 'float64':
          out[i] = b.readDoubleLE(p);
          break;
        case 'uint64':
          out[i] = b.readBigUInt64LE(p);
          break;
        case 'int64':
          out[i] = b.readBigInt64LE(p);
          break;
        case 'bool':
          out[i] = b.readUInt8(p) !== 0; // gguf.cpp treats any non-zero byte as true
          break;
      }
    }
    this.pos = p;
    return out;
  }
}

function fail(problem: string): never {
  throw new GgufError(`not a valid GGUF file: ${problem}`);
}

/** A count from the file, refused if it is absurd for the bytes that remain. */
function checkedCount(raw: bigint, minBytesEach: number, remaining: number, what: string): number {
  const max = Math.floor(remaining / minBytesEach);
  if (raw > BigInt(max)) {
    fail(`${what} ${raw} is impossible: the remaining ${remaining} bytes hold at most ${max}`);
  }
  return Number(raw);
}

function printable(bytes: Uint8Array): string {
  return [...bytes].map((c) => (c >= 0x20 && c < 0x7f ? String.fromCharCode(c) : '?')).join('');
}

function valueType(id: number, key: string): GgufScalarType | 'array' {
  const t = GGUF_VALUE_TYPES[id];
  if (t === undefined) fail(`key '${key}' has invalid GGUF value type ${id}`);
  return t;
}

function readValue(c: Cursor, key: string): GgufValue {
  const type = valueType(c.u32(`type of key '${key}'`), key);
  if (type !== 'array') {
    const [v] = c.scalars(type, 1, `value of key '${key}'`);
    return { type, value: v } as GgufValue;
  }
  const itemType = valueType(c.u32(`array type of key '${key}'`), key);
  if (itemType === 'array') fail(`key '${key}' is an array of arrays, which llama.cpp does not support`);
  const raw = c.u64(`array length of key '${key}'`);
  if (raw > BigInt(MAX_ARRAY_ELEMENTS)) fail(`array of key '${key}' has ${raw} elements, more than the maximum ${MAX_ARRAY_ELEMENTS}`);
  const count = checkedCount(raw, SCALAR_SIZE[itemType], c.remaining, `array length of key '${key}'`);
  return { type: 'array', itemType, value: c.scalars(itemType, count, `array of key '${key}'`) } as GgufValue;
}

function readTensorInfo(c: Cursor, index: number, alignment: number): Omit<GgufTensorInfo, 'offset'> & { offset: bigint } {
  const name = c.str(`name of tensor ${index}`);
  const nameBytes = Buffer.byteLength(name);
  if (nameBytes === 0) fail(`tensor ${index} has an empty name`);
  if (nameBytes >= GGML_MAX_NAME) fail(`tensor ${index} name is ${nameBytes} bytes, ggml allows at most ${GGML_MAX_NAME - 1}`);
  const nDims = c.u32(`dimension count of tensor '${name}'`);
  if (nDims > GGML_MAX_DIMS) fail(`tensor '${name}' has ${nDims} dimensions, at most ${GGML_MAX_DIMS} are allowed`);
  const dims: number[] = [];
  let elements = 1n;
  for (let d = 0; d < nDims; d++) {
    const v = c.u64(`dimension ${d} of tensor '${name}'`);
    if (v >= 2n ** 63n) fail(`tensor '${name}' dimension ${d} is negative (${BigInt.asIntN(64, v)})`);
    // With a zero dimension the element count stays 0, so a dimension past 2^53 would pass the
    // count check below and then lose digits as a JS number.
    if (v > BigInt(Number.MAX_SAFE_INTEGER)) fail(`tensor '${name}' dimension ${d} is ${v}, too large to be real`);
    elements *= v;
    dims.push(Number(v));
  }
  if (elements > BigInt(Number.MAX_SAFE_INTEGER)) fail(`tensor '${name}' has ${elements} elements, too many to be real`);
  const typeId = c.u32(`type of tensor '${name}'`);
  const type: GgmlType | undefined = ggmlTypeById(typeId);
  if (!type) {
    const removed = removedGgmlTypeName(typeId);
    fail(
      removed
        ? `tensor '${name}' uses type ${removed} (${typeId}), which ggml no longer supports; re-quantize the model`
        : `tensor '${name}' has unknown ggml type ${typeId}`,
    );
  }
  const rowLength = dims[0] ?? 1;
  if (rowLength % type.blockSize !== 0) {
    fail(`tensor '${name}' of type ${type.name} has rows of ${rowLength} elements, not a multiple of the block size ${type.blockSize}`);
  }
  const bytes = (Number(elements) / type.blockSize) * type.bytesPerBlock;
  if (!Number.isSafeInteger(alignUp(bytes, alignment))) fail(`tensor '${name}' is too large (${bytes} bytes)`);
  const offset = c.u64(`data offset of tensor '${name}'`);
  return { name, dims, type, bytes, offset };
}

export interface ParseGgufOptions {
  /**
   * Size of the whole file when `bytes` is only its beginning. Counts and lengths are checked
   * against it; running past the end of `bytes` (but not of the file) asks for more input.
   * Defaults to `bytes.length`.
   */
  readonly fileSize?: number;
}

/**
 * Parse a GGUF v2/v3 header (pure). `bytes` may be the whole file or just its beginning; tensor
 * data is never touched. Throws GgufError (a UsageError) naming the problem for any malformed
 * input.
 */
export function parseGgufHeader(bytes: Uint8Array, options: ParseGgufOptions = {}): GgufHeader {
  const fileSize = options.fileSize ?? bytes.length;
  const c = new Cursor(bytes, fileSize);

  c.need(4, 'magic');
  const magic = c.u32('magic');
  if (magic !== GGUF_MAGIC) {
    fail(`bad magic "${printable(Buffer.from(bytes.subarray(0, 4)))}", expected "GGUF"`);
  }
  const version = c.u32('version');
  if (version === 0) fail('version 0');
  if ((version & 0xffff) === 0) fail(`version ${version} looks byte-swapped: big-endian GGUF files are not supported`);
  if (version === 1) fail('GGUF v1 is no longer supported by llama.cpp; convert the model again');
  if (version > 3) fail(`GGUF version ${version} is newer than the supported 3`);

  const rawTensors = c.u64('tensor count');
  const rawKv = c.u64('metadata count');
  const nTensors = checkedCount(rawTensors, MIN_TENSOR_INFO_BYTES, c.remaining, 'tensor count');
  const nKv = checkedCount(rawKv, MIN_KV_BYTES, c.remaining - nTensors * MIN_TENSOR_INFO_BYTES, 'metadata count');

  const metadata = new Map<string, GgufValue>();
  for (let i = 0; i < nKv; i++) {
    const key = c.str(`key ${i}`);
    if (key.length === 0) fail(`metadata key ${i} is empty`);
    if (metadata.has(key)) fail(`duplicate metadata key '${key}'`);
    metadata.set(key, readValue(c, key));
  }

  let alignment = GGUF_DEFAULT_ALIGNMENT;
  const alignValue = metadata.get(GGUF_ALIGNMENT_KEY);
  if (alignValue) {
    if (alignValue.type !== 'uint32') fail(`${GGUF_ALIGNMENT_KEY} must be uint32 but is ${alignValue.type}`);
    alignment = alignValue.value;
    if (alignment === 0 || (alignment & (alignment - 1)) !== 0) fail(`alignment ${alignment} is not a power of two`);
  }

  const tensors: GgufTensorInfo[] = [];
  const names = new Set<string>();
  // gguf.cpp requires tensors in file order, each starting where the previous (padded) ended.
  let expected = 0;
  for (let i = 0; i < nTensors; i++) {
    const t = readTensorInfo(c, i, alignment);
    if (names.has(t.name)) fail(`duplicate tensor name '${t.name}'`);
    names.add(t.name);
    if (t.offset !== BigInt(expected)) fail(`tensor '${t.name}' has data offset ${t.offset}, expected ${expected}`);
    tensors.push({ ...t, offset: expected });
    expected += alignUp(t.bytes, alignment);
    if (!Number.isSafeInteger(expected)) fail('tensor data section is too large');
  }

  const dataOffset = nTensors > 0 ? alignUp(c.pos, alignment) : c.pos;
  return { version: version as 2 | 3, metadata, tensors, alignment, dataOffset, dataSize: expected };
}

export interface GgufFileHeader extends GgufHeader {
  readonly path: string;
  readonly fileSize: number;
  /** Whether the file holds the whole data section (false for header-only files). */
  readonly hasData: boolean;
  /** Bytes read from disk to parse the header. */
  readonly bytesRead: number;
}

export interface ReadGgufOptions {
  /** Initial read; grows by doubling as the header needs. */
  readonly initialBytes?: number;
  /** Refuse headers larger than this (real ones are at most tens of MB, mostly vocabulary). */
  readonly maxHeaderBytes?: number;
}

/**
 * Read just the header of a GGUF file: starts with a small read and doubles it while the parser
 * needs more, so at most max(initialBytes, 2 × header size) bytes are read whatever the size of
 * the tensor data. Errors name the file.
 */
export async function readGgufHeader(path: string, options: ReadGgufOptions = {}): Promise<GgufFileHeader> {
  const maxHeader = options.maxHeaderBytes ?? 512 * 1024 * 1024;
  const notRegular = new UsageError(`cannot read GGUF file ${path}: not a regular file`);
  let fh: import('node:fs/promises').FileHandle;
  try {
    // Opening a FIFO for reading blocks until a writer comes, so look before opening; O_NONBLOCK
    // keeps a path swapped for a FIFO in between from blocking, and the fstat below catches it.
    if (!(await stat(path)).isFile()) throw notRegular;
    fh = await open(path, constants.O_RDONLY | constants.O_NONBLOCK);
  } catch (err) {
    if (err === notRegular) throw err;
    throw new UsageError(`cannot read GGUF file ${path}: ${errorMessage(err)}`);
  }
  try {
    const st = await fh.stat();
    if (!st.isFile()) throw notRegular;
    const fileSize = st.size;
    let buf = Buffer.alloc(Math.min(fileSize, options.initialBytes ?? 256 * 1024, maxHeader));
    let filled = 0;
    for (;;) {
      while (filled < buf.length) {
        const { bytesRead } = await fh.read(buf, filled, buf.length - filled, filled);
        if (bytesRead === 0) break; // file shrank under us; the parser reports truncation
        filled += bytesRead;
      }
      try {
        const header = parseGgufHeader(buf.subarray(0, filled), { fileSize: filled < buf.length ? filled : fileSize });
        return { ...header, path, fileSize, hasData: fileSize >= header.dataOffset + header.dataSize, bytesRead: filled };
      } catch (err) {
        if (!(err instanceof NeedMoreBytes)) throw err;
        if (err.needed > maxHeader) {
          throw new GgufError(`header needs more than ${maxHeader} bytes, which no real model has`);
        }
        const next = Buffer.alloc(Math.min(fileSize, maxHeader, Math.max(err.needed, buf.length * 2)));
        buf.copy(next, 0, 0, filled);
        buf = next;
      }
    }
  } catch (err) {
    if (err instanceof GgufError) throw new GgufError(`${path}: ${err.message}`);
    throw err;
  } finally {
    await fh.close();
  }
}
