// Completes package-lock.json with other platforms' optional packages (biome, node-llama-cpp
// prebuilt bindings) when the lock was written against a registry mirror that lacks them: npm ci
// otherwise refuses the lock as "not in sync". Run after `npm install` changes the lock:
//   node scripts/complete-lock.mjs
// Entries carry os/cpu/libc, so npm skips them on this platform and never fetches them.
import { readFileSync, writeFileSync } from 'node:fs';
const lock = JSON.parse(readFileSync('package-lock.json', 'utf8'));
const pk = lock.packages;
const added = [];
function platform(name) {
  const n = name.split('/').pop();
  const os = /darwin|mac/.test(n) ? 'darwin' : /win32|win-/.test(n) ? 'win32' : /android/.test(n) ? 'android' : /linux/.test(n) ? 'linux' : null;
  const cpu = /arm64/.test(n) ? 'arm64' : /riscv64/.test(n) ? 'riscv64' : /armv7l|arm(?!64)/.test(n) ? 'arm' : /x64/.test(n) ? 'x64' : null;
  const libc = /musl/.test(n) ? 'musl' : null;
  return { os, cpu, libc };
}
for (const [path, info] of Object.entries(pk)) {
  for (const [dep, range] of Object.entries(info.optionalDependencies ?? {})) {
    const key = `node_modules/${dep}`;
    if (pk[key] || pk[`${path}/node_modules/${dep}`]) continue;
    const { os, cpu, libc } = platform(dep);
    if (!os || !cpu) { console.error('cannot infer platform for', dep); process.exit(1); }
    const version = range.replace(/^[\^~=]/, '');
    pk[key] = { version, cpu: [cpu], license: info.license, optional: true, os: [os], ...(libc ? { libc: [libc] } : {}) };
    added.push(`${dep}@${version} (${os}/${cpu}${libc ? '/' + libc : ''})`);
  }
}
lock.packages = Object.fromEntries(Object.entries(pk).sort(([a], [b]) => (a === '' ? -1 : b === '' ? 1 : a.localeCompare(b))));
writeFileSync('package-lock.json', JSON.stringify(lock, null, 2) + '\n');
console.log(added.join('\n'));
