import { stat } from 'node:fs/promises';

/**
 * What a load derives from a model file's header (its profile on the coordinator, its tensor
 * layout on an agent), remembered while the file's path, size and mtime stay — the key the
 * SHA-256 cache uses (model/file-identity.ts) — so a repeated load does not parse megabytes of
 * vocabulary again for the same answer. In memory: coordinators and agents live long, and a
 * restart reads each header once. At most `max` files, the least recently used dropped; a
 * failed read is not kept.
 */
export class FileMemo<T> {
  readonly #byFile = new Map<string, Promise<T>>();

  constructor(
    private readonly read: (path: string) => Promise<T>,
    private readonly max = 16,
  ) {}

  /** `st`: the caller's own stat of the file, when it has one (the key must be what it uses). */
  async get(path: string, st?: { readonly size: number; readonly mtimeMs: number }): Promise<T> {
    const { size, mtimeMs } = st ?? (await stat(path));
    const key = `${path}\0${size}\0${mtimeMs}`;
    let value = this.#byFile.get(key);
    if (value) this.#byFile.delete(key); // set again below: most recently used last
    else value = this.read(path);
    this.#byFile.set(key, value);
    value.catch(() => {
      if (this.#byFile.get(key) === value) this.#byFile.delete(key);
    });
    for (const old of this.#byFile.keys()) {
      if (this.#byFile.size <= this.max) break;
      this.#byFile.delete(old);
    }
    return value;
  }
}
