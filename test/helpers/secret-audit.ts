import { execFile } from 'node:child_process';
import { readdir, readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { expect } from 'vitest';

const execFileP = promisify(execFile);

/** A finding: which secret (named, never printed) turned up where. */
export interface Leak {
  readonly secret: string;
  readonly where: string;
}

/**
 * The acceptance check "grep of all logs and `ps` output during the suite: no token, key or
 * private key appears", for a test/security file that starts processes holding secrets. It
 * collects the secrets the file hands out (join tokens and their secret part, API keys, every
 * private key file under the state dirs — whole and line by line, so a partial PEM in a log is
 * caught too), samples `ps -eo pid,args` while the processes run (not only at the end: a secret
 * on a short-lived command line is gone by then), and reads the processes' output at check time.
 */
export class SecretAudit {
  readonly #secrets = new Map<string, string>();
  readonly #logs: { name: string; text: () => string }[] = [];
  readonly #ps: string[] = [];
  #timer: NodeJS.Timeout | undefined;
  #sampling: Promise<void> | undefined;

  /** A secret value; a join token (`orchard1.<id>.<secret>.<ca>`) also adds its secret part. */
  secret(label: string, value: string): void {
    const v = value.trim();
    if (v.length < 8) throw new RangeError(`secret ${label} is too short to search for`);
    this.#secrets.set(v, label);
    const parts = v.split('.');
    if (parts[0] === 'orchard1' && parts.length === 4) this.#secrets.set(parts[2]!, `${label} (secret part)`);
  }

  /** A private key (PEM) held in memory, e.g. a test CA's: whole, and line by line. */
  privateKey(label: string, pem: string): void {
    this.secret(label, pem);
    // the base64 body lines of a PEM: a log that printed part of a key still matches
    for (const line of pem.split('\n')) if (line.length >= 40 && !line.startsWith('-----')) this.secret(`${label} (a line)`, line);
  }

  /** Every private key under `dirs` (files named `*.key`, and the coordinator's `admin-key`). Returns how many. */
  async keysUnder(...dirs: string[]): Promise<number> {
    let n = 0;
    for (const dir of dirs) {
      for (const f of await readdir(dir, { recursive: true, withFileTypes: true })) {
        if (!f.isFile() || !(f.name.endsWith('.key') || f.name === 'admin-key')) continue;
        const path = join(f.parentPath, f.name);
        this.privateKey(path, await readFile(path, 'utf8'));
        n++;
      }
    }
    return n;
  }

  /** Output of a process (read when checked, so everything it printed counts). */
  log(name: string, p: { readonly out: string; readonly err: string }): void {
    this.#logs.push({ name, text: () => `${p.out}\n${p.err}` });
  }

  /** Take one `ps` snapshot now. */
  async sample(): Promise<void> {
    this.#ps.push((await execFileP('ps', ['-eo', 'pid,args'], { maxBuffer: 16 * 2 ** 20 })).stdout);
  }

  /** Sample `ps` every `intervalMs` until stop(). */
  start(intervalMs = 1000): void {
    this.#timer = setInterval(() => {
      this.#sampling ??= this.sample().finally(() => {
        this.#sampling = undefined;
      });
    }, intervalMs);
    this.#timer.unref();
  }

  async stop(): Promise<void> {
    clearInterval(this.#timer);
    await this.#sampling;
  }

  /** Every place a secret turned up, plus what was searched (so a caller can see the check had material). */
  findings(): { leaks: Leak[]; secrets: number; logBytes: number; psSnapshots: number } {
    const leaks: Leak[] = [];
    const logs = this.#logs.map((l) => ({ name: l.name, text: l.text() }));
    for (const [value, label] of this.#secrets) {
      for (const l of logs) if (l.text.includes(value)) leaks.push({ secret: label, where: `log of ${l.name}` });
      this.#ps.forEach((ps, i) => {
        if (ps.includes(value)) leaks.push({ secret: label, where: `ps snapshot ${i}` });
      });
    }
    // a join token's shape on any command line, whoever minted it
    this.#ps.forEach((ps, i) => {
      if (/orchard1\.[0-9a-f]{12}\./.test(ps)) leaks.push({ secret: 'a join token', where: `ps snapshot ${i}` });
    });
    return { leaks, secrets: this.#secrets.size, logBytes: logs.reduce((a, l) => a + l.text.length, 0), psSnapshots: this.#ps.length };
  }

  /**
   * The end of a security file: stop sampling, take a last `ps`, add the private keys under
   * `keyDirs` (at least `minKeys`), and expect no leak — with material enough that the check meant
   * something (logs were written, `ps` was sampled while the processes ran).
   */
  async expectNoLeaks(keyDirs: readonly string[], minKeys: number): Promise<void> {
    await this.stop();
    await this.sample();
    expect(await this.keysUnder(...keyDirs)).toBeGreaterThanOrEqual(minKeys);
    const f = this.findings();
    expect(f.leaks).toEqual([]);
    expect(f.logBytes).toBeGreaterThan(1000);
    expect(f.psSnapshots).toBeGreaterThanOrEqual(3);
  }
}
