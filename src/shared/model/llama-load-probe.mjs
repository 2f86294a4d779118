// Run by llama-load-check.ts in a child process: `node llama-load-probe.mjs NODE_LLAMA_CPP_URL MODEL.gguf`.
// llama.cpp's loader opens the model with vocab_only (header, hyperparameters, vocabulary; no
// tensor data) and the verdict is printed as the last line of stdout, with llama.cpp's own error
// log lines when it refuses. A plain .mjs file (not -e): node-llama-cpp re-runs process.execArgv
// when it tests its binary in a subprocess.
import { writeSync } from 'node:fs';

const [mod, path] = process.argv.slice(2);
const { getLlama, LlamaLogLevel } = await import(mod);
const errors = [];
// Synchronous: node-llama-cpp's own steps after llama.cpp's load may abort the process on the
// tiny vocabulary of a header-only file; llama.cpp's verdict must already be out by then.
const say = (o) => writeSync(1, `\n${JSON.stringify(o)}\n`);
let llama;
try {
  llama = await getLlama({
    build: 'never',
    gpu: process.platform === 'darwin' ? 'metal' : false,
    progressLogs: false,
    logLevel: LlamaLogLevel.info,
    logger: (level, msg) => {
      if (level === 'error' || level === 'fatal') errors.push(String(msg).trim());
      // llama.cpp's llama_model_load says this when arch, hyperparameters and vocabulary loaded.
      else if (/vocab only - skipping tensors/.test(msg)) say({ checked: true, ok: true });
    },
  });
} catch (e) {
  say({ checked: false, why: String(e?.message || e) });
  process.exit(0);
}
try {
  const m = await llama.loadModel({ modelPath: path, vocabOnly: true });
  await m.dispose();
  say({ checked: true, ok: true });
} catch (e) {
  // llama.cpp's log lines reach the logger asynchronously: let the last ones arrive.
  await new Promise((r) => setTimeout(r, 300));
  say({ checked: true, ok: false, errors, message: String(e?.message || e) });
}
process.exit(0);
