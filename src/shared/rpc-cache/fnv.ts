/**
 * FNV-1a 64-bit exactly as ggml-rpc computes it (`fnv_hash` in ggml/src/ggml-rpc/ggml-rpc.cpp):
 * offset basis 0xcbf29ce484222325, prime 0x100000001b3, one byte at a time (xor, then multiply
 * mod 2^64). The rpc-server names its tensor-cache files by this hash of the tensor bytes.
 *
 * Why 16-bit limbs instead of BigInt: the hash runs over gigabytes, and a BigInt multiply per byte
 * is two orders of magnitude slower. The prime is 2^40 + 0x1b3, so hash × prime = hash × 0x1b3 +
 * (hash << 40); with four 16-bit limbs every intermediate stays below 2^31 and V8 keeps it in
 * small integers. Streaming: feed chunks to `update` in order; the state is four numbers.
 */
export class Fnv1a64 {
  // limbs, least significant first; initial value = offset basis 0xcbf29ce484222325
  private h0 = 0x2325;
  private h1 = 0x8422;
  private h2 = 0x9ce4;
  private h3 = 0xcbf2;

  update(data: Uint8Array): this {
    let h0 = this.h0;
    let h1 = this.h1;
    let h2 = this.h2;
    let h3 = this.h3;
    for (let i = 0, n = data.length; i < n; i++) {
      h0 ^= data[i]!;
      const t0 = h0 * 0x1b3;
      let t1 = h1 * 0x1b3;
      let t2 = h2 * 0x1b3 + (h0 << 8);
      const t3 = h3 * 0x1b3 + (h1 << 8);
      t1 += t0 >>> 16;
      h0 = t0 & 0xffff;
      t2 += t1 >>> 16;
      h1 = t1 & 0xffff;
      h3 = (t3 + (t2 >>> 16)) & 0xffff;
      h2 = t2 & 0xffff;
    }
    this.h0 = h0;
    this.h1 = h1;
    this.h2 = h2;
    this.h3 = h3;
    return this;
  }

  /** The hash as ggml-rpc prints it into file names: `%016" PRIx64` (16 lowercase hex digits). */
  hex(): string {
    const p = (v: number) => v.toString(16).padStart(4, '0');
    return p(this.h3) + p(this.h2) + p(this.h1) + p(this.h0);
  }

  value(): bigint {
    return BigInt(`0x${this.hex()}`);
  }
}

export function fnv1a64Hex(data: Uint8Array): string {
  return new Fnv1a64().update(data).hex();
}
