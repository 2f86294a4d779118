/**
 * Fields StartEngine no longer has (proto `reserved`): a decoder skips unknown fields silently, so
 * a caller built on the old schema (or an attacker writing raw bytes) would get its engine started
 * with the `env`/`args` quietly dropped. The agent refuses such a request instead, so nothing starts
 * that the caller believes runs differently. Pure: reads the wire format's top-level tags only.
 */
export const REMOVED_START_ENGINE_FIELDS: Readonly<Record<number, string>> = { 3: 'bind_host', 8: 'args', 11: 'env' };

/** Where the wrapped deserializer leaves what it found (a symbol: invisible to the zod schema). */
export const REMOVED_FIELDS = Symbol('removedFields');

/** Top-level field numbers present in one protobuf message; stops at the first malformed byte. */
export function topLevelFields(buf: Uint8Array): Set<number> {
  const found = new Set<number>();
  let i = 0;
  const varint = (): number | undefined => {
    let v = 0;
    for (let shift = 0; shift < 64 && i < buf.length; shift += 7) {
      const b = buf[i++]!;
      v += (b & 0x7f) * 2 ** shift;
      if ((b & 0x80) === 0) return v;
    }
    return undefined;
  };
  while (i < buf.length) {
    const tag = varint();
    if (tag === undefined) break;
    const field = Math.floor(tag / 8);
    const wire = tag % 8;
    found.add(field);
    if (wire === 0) {
      if (varint() === undefined) break;
    } else if (wire === 1) i += 8;
    else if (wire === 5) i += 4;
    else if (wire === 2) {
      const len = varint();
      if (len === undefined) break;
      i += len;
    } else break; // groups: not in this schema
  }
  return found;
}

/** Names of removed StartEngine fields present in `buf`. */
export function removedStartEngineFields(buf: Uint8Array): string[] {
  return [...topLevelFields(buf)].flatMap((n) => (REMOVED_START_ENGINE_FIELDS[n] ? [REMOVED_START_ENGINE_FIELDS[n]] : []));
}
