import { createHash, randomBytes } from 'node:crypto';
import { open, rename, stat, unlink } from 'node:fs/promises';
import { basename, dirname, join } from 'node:path';
import { OrchardError, UsageError, errorMessage } from '../errors.ts';
import { type GgmlType, type GgmlTypeName, ggmlType, tensorBytes } from './ggml-types.ts';
import {
  GGML_MAX_DIMS,
  GGML_MAX_NAME,
  GGUF_ALIGNMENT_KEY,
  GGUF_DEFAULT_ALIGNMENT,
  GGUF_MAGIC,
  type GgufHeader,
  type GgufScalarType,
  type GgufTensorInfo,
  type GgufValue,
  alignUp,
  ggufValueTypeId,
} from './types.ts';

/**
 * Tensor bytes for the writer: a whole buffer, or a function returning chunks so multi-GB
 * models stream through a small buffer instead of sitting in memory.
 */
export type GgufTensorData = Uint8Array | (() => Iterable<Uint8Array> | AsyncIterable<Uint8Array>);

export interface GgufTensorSpec {
  readonly name: string;
  /** ggml order: dims[0] is the row length. */
  readonly dims: readonly number[];
  readonly type: GgmlType | GgmlTypeName | number;
  /** Omitted only for header-only files. */
  readonly data?: GgufTensorData;
}

export interface GgufSpec {
  /** Written in this order; `general.alignment` (uint32, power of two) sets the alignment. */
  readonly metadata: ReadonlyMap<string, GgufValue> | Iterable<readonly [string, GgufValue]>;
  readonly tensors: readonly GgufTensorSpec[];
}

export interface GgufWriteResult {
  readonly path: string;
  readonly bytes: number;
  readonly sha256: string;
  readonly header: GgufHeader;
}

const ENC = new TextEncoder();

/** Growable little-endian byte builder for the header (kilobytes to a few MB). */
class ByteBuilder {
  private buf = Buffer.alloc(64 * 1024);
  length = 0;

  private reserve(n: number): void {
    if (this.length + n <= this.buf.length) return;
    let size = this.buf.length * 2;
    while (size < this.length + n) size *= 2;
    const next = Buffer.alloc(size);
    this.buf.copy(next, 0, 0, this.length);
    this.buf = next;
  }
  u8(v: number): void {
    this.reserve(1);
    this.buf.writeUInt8(v, this.length);
    this.length += 1;
  }
  i8(v: number): void {
    this.reserve(1);
    this.buf.writeInt8(v, this.length);
    this.length += 1;
  }
  u16(v: number): void {
    this.reserve(2);
    this.buf.writeUInt16LE(v, this.length);
    this.length += 2;
  }
  i16(v: number): void {
    this.reserve(2);
    this.buf.writeInt16LE(v, this.length);
    this.length += 2;
  }
  u32(v: number): void {
    this.reserve(4);
    this.buf.writeUInt32LE(v, this.length);
    this.length += 4;
  }
  i32(v: number): void {
    this.reserve(4);
    this.buf.writeInt32LE(v, this.length);
    this.length += 4;
  }
  f32(v: number): void {
    this.reserve(4);
    this.buf.writeFloatLE(v, this.length);
    this.length += 4;
  }
  f64(v: number): void {
    this.reserve(8);
    this.buf.writeDoubleLE(v, this.length);
    this.length += 8;
  }
  u64(v: bigint | number): void {
    this.reserve(8);
    this.buf.writeBigUInt64LE(BigInt(v), this.length);
    this.length += 8;
  }
  i64(v: bigint): void {
    this.reserve(8);
    this.buf.writeBigInt64LE(v, this.length);
    this.length += 8;
  }
  bytes(b: Uint8Array): void {
    this.reserve(b.length);
    this.buf.set(b, this.length);
    this.length += b.length;
  }
  str(s: string): void {
    const b = ENC.encode(s);
    this.u64(b.length);
    this.bytes(b);
  }
  zeros(n: number): void {
    this.reserve(n);
    this.buf.fill(0, this.length, this.length + n);
    this.length += n;
  }
  result(): Buffer {
    return this.buf.subarray(0, this.length);
  }
}

const INT_RANGES: Record<string, readonly [number, number]> = {
  uint8: [0, 0xff],
  int8: [-0x80, 0x7f],
  uint16: [0, 0xffff],
  int16: [-0x8000, 0x7fff],
  uint32: [0, 0xffffffff],
  int32: [-0x80000000, 0x7fffffff],
};

function checkScalar(key: string, type: GgufScalarType, v: unknown): void {
  const range = INT_RANGES[type];
  const bad = (): never => {
    throw new UsageError(`GGUF key ${key}: ${String(v)} is not a valid ${type}`);
  };
  if (range) {
    if (typeof v !== 'number' || !Number.isInteger(v) || v < range[0] || v > range[1]) bad();
  } else if (type === 'float32' || type === 'float64') {
    if (typeof v !== 'number') bad();
  } else if (type === 'uint64') {
    if (typeof v !== 'bigint' || v < 0n || v > 0xffffffffffffffffn) bad();
  } else if (type === 'int64') {
    if (typeof v !== 'bigint' || v < -(2n ** 63n) || v >= 2n ** 63n) bad();
  } else if (type === 'bool') {
    if (typeof v !== 'boolean') bad();
  } else if (type === 'string') {
    if (typeof v !== 'string') bad();
  }
}

function writeScalar(b: ByteBuilder, type: GgufScalarType, v: unknown): void {
  switch (type) {
    case 'uint8':
      b.u8(v as number);
      return;
    case 'int8':
      b.i8(v as number);
      return;
    case 'uint16':
      b.u16(v as number);
      return;
    case 'int16':
      b.i16(v as number);
      return;
    case 'uint32':
      b.u32(v as number);
      return;
    case 'int32':
      b.i32(v as number);
      return;
    case 'float32':
      b.f32(v as number);
      return;
    case 'float64':
      b.f64(v as number);
      return;
    case 'uint64':
      b.u64(v as bigint);
      return;
    case 'int64':
      b.i64(v as bigint);
      return;
    case 'bool':
      b.u8(v ? 1 : 0);
      return;
    case 'string':
      b.str(v as string);
      return;
  }
}

/** Validated, laid-out form of a spec: the header bytes and where each tensor's data goes. */
export interface GgufLayout {
  /** Everything before the data section, padding included (length = header.dataOffset). */
  readonly headerBytes: Buffer;
  readonly header: GgufHeader;
}

/**
 * Encode the header of a GGUF v3 file (pure): metadata, tensor infos with offsets laid out the
 * way gguf.cpp expects them (each tensor's data padded to the alignment, in order), and the
 * padding up to the data section. Throws UsageError for anything llama.cpp would refuse.
 */
export function encodeGgufHeader(spec: GgufSpec): GgufLayout {
  const metadata = new Map<string, GgufValue>();
  for (const [key, value] of spec.metadata instanceof Map ? spec.metadata.entries() : spec.metadata) {
    if (key.length === 0) throw new UsageError('GGUF metadata key must not be empty');
    if (metadata.has(key)) throw new UsageError(`duplicate GGUF metadata key ${key}`);
    if (value.type === 'array') {
      if ((value.itemType as string) === 'array') throw new UsageError(`GGUF key ${key}: nested arrays are not supported by llama.cpp`);
      for (const item of value.value) checkScalar(key, value.itemType, item);
    } else {
      checkScalar(key, value.type, value.value);
    }
    metadata.set(key, value);
  }

  const alignValue = metadata.get(GGUF_ALIGNMENT_KEY);
  let alignment = GGUF_DEFAULT_ALIGNMENT;
  if (alignValue) {
    if (alignValue.type !== 'uint32') throw new UsageError(`${GGUF_ALIGNMENT_KEY} must be uint32`);
    alignment = alignValue.value;
    if (alignment === 0 || (alignment & (alignment - 1)) !== 0) {
      throw new UsageError(`${GGUF_ALIGNMENT_KEY} ${alignment} is not a power of two`);
    }
  }

  const tensors: GgufTensorInfo[] = [];
  const names = new Set<string>();
  let offset = 0;
  for (const t of spec.tensors) {
    const nameBytes = ENC.encode(t.name).length;
    if (nameBytes === 0 || nameBytes >= GGML_MAX_NAME) {
      throw new UsageError(`tensor name "${t.name}" must be 1..${GGML_MAX_NAME - 1} bytes`);
    }
    if (names.has(t.name)) throw new UsageError(`duplicate tensor name ${t.name}`);
    names.add(t.name);
    if (t.dims.length < 1 || t.dims.length > GGML_MAX_DIMS) {
      throw new UsageError(`tensor ${t.name} has ${t.dims.length} dimensions; GGUF allows 1..${GGML_MAX_DIMS}`);
    }
    for (const d of t.dims) {
      if (!Number.isSafeInteger(d) || d < 0) throw new UsageError(`tensor ${t.name} has invalid dimension ${d}`);
    }
    const type = ggmlType(t.type);
    const bytes = tensorBytes(type, t.dims);
    tensors.push({ name: t.name, dims: [...t.dims], type, offset, bytes });
    offset += alignUp(bytes, alignment);
  }

  const b = new ByteBuilder();
  b.u32(GGUF_MAGIC);
  b.u32(3);
  b.u64(tensors.length);
  b.u64(metadata.size);
  for (const [key, value] of metadata) {
    b.str(key);
    b.u32(ggufValueTypeId(value.type));
    if (value.type === 'array') {
      b.u32(ggufValueTypeId(value.itemType));
      b.u64(value.value.length);
      for (const item of value.value) writeScalar(b, value.itemType, item);
    } else {
      writeScalar(b, value.type, value.value);
    }
  }
  for (const t of tensors) {
    b.str(t.name);
    b.u32(t.dims.length);
    for (const d of t.dims) b.u64(d);
    b.u32(t.type.id);
    b.u64(t.offset);
  }
  // gguf.cpp only pads to the data section when there are tensors.
  const dataOffset = tensors.length > 0 ? alignUp(b.length, alignment) : b.length;
  b.zeros(dataOffset - b.length);
  return {
    headerBytes: b.result(),
    header: { version: 3, metadata, tensors, alignment, dataOffset, dataSize: offset },
  };
}

/** Buffered, hashing sink over a file handle. */
class FileSink {
  private readonly buf = Buffer.alloc(4 * 1024 * 1024);
  private used = 0;
  private readonly hash = createHash('sha256');
  written = 0;

  constructor(private readonly fh: import('node:fs/promises').FileHandle) {}

  async write(chunk: Uint8Array): Promise<void> {
    this.hash.update(chunk);
    this.written += chunk.length;
    if (chunk.length >= this.buf.length) {
      await this.flush();
      await this.fh.write(chunk);
      return;
    }
    if (this.used + chunk.length > this.buf.length) await this.flush();
    this.buf.set(chunk, this.used);
    this.used += chunk.length;
  }
  async zeros(n: number): Promise<void> {
    if (n > 0) await this.write(new Uint8Array(n));
  }
  async flush(): Promise<void> {
    let off = 0;
    while (off < this.used) {
      const { bytesWritten } = await this.fh.write(this.buf, off, this.used - off);
      off += bytesWritten;
    }
    this.used = 0;
  }
  digest(): string {
    return this.hash.digest('hex');
  }
}

function describeFsError(err: unknown, dir: string): string {
  const code = (err as NodeJS.ErrnoException).code;
  if (code === 'ENOENT') return `directory ${dir} does not exist`;
  if (code === 'ENOTDIR') return `${dir} is not a directory`;
  if (code === 'EACCES' || code === 'EPERM') return `permission denied in ${dir}`;
  if (code === 'EROFS') return `${dir} is on a read-only file system`;
  return errorMessage(err);
}

/**
 * Write a GGUF v3 file. Data is streamed tensor by tensor into a temp file next to `path`,
 * checked against each tensor's exact size, and renamed over `path` only when complete, so a
 * failure (bad spec, short data, full disk) never leaves a partial file at `path`.
 * `headerOnly` writes metadata and tensor infos only (for planning big models without data).
 */
export async function writeGguf(path: string, spec: GgufSpec, opts: { headerOnly?: boolean } = {}): Promise<GgufWriteResult> {
  const layout = encodeGgufHeader(spec); // validate before touching the file system
  if (!opts.headerOnly) {
    for (const t of spec.tensors) {
      if (t.data === undefined) throw new UsageError(`tensor ${t.name} has no data (only header-only files may omit it)`);
    }
  }
  const existing = await stat(path).catch(() => undefined);
  if (existing?.isDirectory()) throw new UsageError(`cannot write ${path}: it is a directory`);
  const tmp = join(dirname(path), `.${basename(path)}.${process.pid}.${randomBytes(4).toString('hex')}.tmp`);
  let fh: import('node:fs/promises').FileHandle;
  try {
    fh = await open(tmp, 'wx');
  } catch (err) {
    throw new UsageError(`cannot write ${path}: ${describeFsError(err, dirname(path))}`);
  }
  let ok = false;
  try {
    const sink = new FileSink(fh);
    await sink.write(layout.headerBytes);
    if (!opts.headerOnly) {
      const { alignment } = layout.header;
      for (let i = 0; i < spec.tensors.length; i++) {
        const t = spec.tensors[i]!;
        const info = layout.header.tensors[i]!;
        const start = sink.written;
        const data = t.data!;
        if (data instanceof Uint8Array) {
          await sink.write(data);
        } else {
          for await (const chunk of data()) await sink.write(chunk);
        }
        const got = sink.written - start;
        if (got !== info.bytes) {
          throw new OrchardError(`tensor ${t.name}: got ${got} bytes of data, expected ${info.bytes}`);
        }
        await sink.zeros(alignUp(info.bytes, alignment) - info.bytes);
      }
    }
    await sink.flush();
    await fh.close();
    await rename(tmp, path).catch((err: unknown) => {
      // e.g. `path` is an existing directory
      throw new UsageError(`cannot write ${path}: ${(err as NodeJS.ErrnoException).code === 'EISDIR' ? 'it is a directory' : errorMessage(err)}`);
    });
    ok = true;
    return { path, bytes: sink.written, sha256: sink.digest(), header: layout.header };
  } finally {
    if (!ok) {
      await fh.close().catch(() => {});
      await unlink(tmp).catch(() => {});
    }
  }
}
