import { execFile } from 'node:child_process';
import { stat } from 'node:fs/promises';
import { createRequire } from 'node:module';
import { homedir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { cacheRoot } from '../cache-dir.ts';
import type { GgufHeader } from '../gguf/types.ts';
import { readJsonMap, writeJsonMap } from '../json-map-file.ts';

/**
 * Whether llama.cpp itself can load a GGUF, asked of llama.cpp rather than of a list of names:
 * llama.cpp's own loader (node-llama-cpp's prebuilt binding of the same llama.cpp release the
 * engines are built from) opens the file with `vocab_only` — it reads the header, the
 * architecture, every hyperparameter the architecture's `load_hparams` requires and the
 * vocabulary, exactly as llama-server would, but allocates and reads no tensor data. A file it
 * refuses is refused with llama.cpp's own words, before any engine is started.
 *
 * It runs in a child process: a malformed file must not be able to crash the caller (the
 * coordinator), and node-llama-cpp tests its binary in a subprocess on Linux anyway (2–5 s), so
 * verdicts are kept per file (path, size, mtime, binding version) in the per-user cache
 * (`llama-load-check.json`), as make trusts mtimes: a rewritten file is asked again.
 */
export type LlamaLoadVerdict =
  | { readonly checked: true; readonly refusal?: string }
  /** Not asked: no llama.cpp binding for this platform (the engine reports at load), or a header-only file. */
  | { readonly checked: false; readonly why: string };

const PROBE = fileURLToPath(new URL('./llama-load-probe.mjs', import.meta.url));

/** llama.cpp's reason from its error log: the specific lines, without the generic wrapper. */
export function llamaRefusalOf(errors: readonly string[], fallback: string): string {
  const specific = errors
    .filter((l) => l.length > 0 && !/llama_model_load_from_file_impl: failed to load model/.test(l))
    .map((l) => l.replace(/^llama_model_load: error loading model: /, ''));
  const unique = [...new Set(specific)];
  return `llama.cpp cannot load this file: ${unique.length > 0 ? unique.join('; ') : fallback}`;
}

const KEEP = 1000;
const verdicts = new Map<string, Promise<LlamaLoadVerdict>>();

/** Ask llama.cpp's loader about `path` (a regular GGUF file Orchard's own reader has parsed). */
export async function llamaLoadVerdict(path: string, header: GgufHeader, env: NodeJS.ProcessEnv = process.env, timeoutMs = 120_000): Promise<LlamaLoadVerdict> {
  // Orchard's header-only GGUFs (the presets of 400 GB models) say they hold no tensor data;
  // llama.cpp's loader checks every tensor lies within the file before it reads anything else,
  // so it could only say "incomplete". They are planning inputs, never loaded: not asked.
  const marked = header.metadata.get('orchard.header_only');
  if (marked?.type === 'bool' && marked.value) return { checked: false, why: 'an Orchard header-only file (no tensor data): planned, never loaded' };
  // The same for any file that ends where its data section starts (`testmodel --header-only`,
  // a header written for planning): not one tensor byte to load. A file cut anywhere inside its
  // data is still asked, and refused with llama.cpp's words.
  const size = (await stat(path)).size;
  if (header.dataSize > 0 && size <= header.dataOffset) return { checked: false, why: 'a header without tensor data: planned, never loaded' };
  let mod: string;
  try {
    mod = createRequire(import.meta.url).resolve('node-llama-cpp');
  } catch (err) {
    return { checked: false, why: `node-llama-cpp is not installed: ${(err as Error).message}` };
  }
  const st = await stat(path);
  const key = `${mod}\0${path}\0${st.size}\0${st.mtimeMs}`;
  let v = verdicts.get(key);
  if (!v) {
    v = cachedProbe(key, pathToFileURL(mod).href, path, env, timeoutMs);
    verdicts.set(key, v);
  }
  return v;
}

async function cachedProbe(key: string, mod: string, path: string, env: NodeJS.ProcessEnv, timeoutMs: number): Promise<LlamaLoadVerdict> {
  const file = join(cacheRoot(env, process.platform, homedir()), 'llama-load-check.json');
  const known = (await readJsonMap(file))[key];
  if (known) return JSON.parse(known) as LlamaLoadVerdict;
  const v = await probe(mod, path, timeoutMs);
  // Only real verdicts are kept: a missing binding or a timeout is asked again next time.
  if (v.checked) {
    // Newest last; test runs write many temporary files, so only the latest KEEP are kept.
    const entries = Object.entries({ ...(await readJsonMap(file)), [key]: JSON.stringify(v) }).slice(-KEEP);
    await writeJsonMap(file, Object.fromEntries(entries)).catch(() => undefined);
  }
  return v;
}

function probe(mod: string, path: string, timeoutMs: number): Promise<LlamaLoadVerdict> {
  return new Promise((resolve) => {
    execFile(process.execPath, [PROBE, mod, path], { timeout: timeoutMs, maxBuffer: 16 << 20 }, (err, stdout) => {
      const last = stdout.trim().split('\n').pop() ?? '';
      let out: { checked?: boolean; ok?: boolean; why?: string; errors?: string[]; message?: string } | undefined;
      try {
        out = JSON.parse(last) as typeof out;
      } catch {
        out = undefined;
      }
      if (!out && err?.killed) resolve({ checked: false, why: `llama.cpp's loader gave no verdict within ${timeoutMs / 1000} s` });
      // A loader that crashed on the file (no verdict line) is llama.cpp refusing it too.
      else if (!out) resolve({ checked: true, refusal: llamaRefusalOf([], `the loader exited without a verdict (${err ? err.message.split('\n')[0] : 'no output'})`) });
      else if (out.checked === false) resolve({ checked: false, why: out.why ?? 'no llama.cpp binding' });
      else resolve(out.ok ? { checked: true } : { checked: true, refusal: llamaRefusalOf(out.errors ?? [], out.message ?? 'unknown error') });
    });
  });
}
