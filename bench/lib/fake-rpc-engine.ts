/**
 * A stand-in ggml-rpc-server for bench:tunnel's transport replay (rpc-traffic.ts), run as its own
 * process: `node --import tsx fake-rpc-engine.ts [--host H]` (default 127.0.0.1), prints
 * `{"port":N}`. It reads the request framing, spins on a graph compute for as long as the
 * connection asked (the worker's share of a token; SET_COMPUTE_MS, a command byte no ggml-rpc
 * build uses, payload u32 LE ms) and answers GET_TENSOR with `| size (u64 LE) | size bytes |` as
 * the real server does; other commands get no reply, as in a decode step.
 */
import { createServer } from 'node:net';

const spin = (ms: number) => {
  const until = performance.now() + ms;
  while (performance.now() < until);
};

/** Keep in step with rpc-traffic.ts. */
const SET_COMPUTE_MS = 0xff;

const server = createServer({ noDelay: true }, (s) => {
  let buf: Buffer = Buffer.alloc(0);
  let computeMs = 0;
  s.on('data', (chunk: Buffer) => {
    buf = buf.length ? Buffer.concat([buf, chunk]) : chunk;
    for (;;) {
      if (buf.length < 9) return;
      const size = Number(buf.readBigUInt64LE(1));
      if (buf.length < 9 + size) return;
      const cmd = buf[0]!;
      const payload = buf.subarray(9, 9 + size);
      buf = buf.subarray(9 + size);
      if (cmd === SET_COMPUTE_MS) computeMs = payload.readUInt32LE(0);
      if (cmd === 10 || cmd === 16) spin(computeMs); // GRAPH_COMPUTE, GRAPH_RECOMPUTE
      if (cmd === 8) {
        // GET_TENSOR: | rpc_tensor | offset u64 | size u64 |
        const want = payload.readBigUInt64LE(payload.length - 8);
        const header = Buffer.alloc(8);
        header.writeBigUInt64LE(want);
        s.write(header);
        s.write(Buffer.alloc(Number(want)));
      }
    }
  });
  s.on('error', () => s.destroy());
});
const hostAt = process.argv.indexOf('--host');
server.listen(0, hostAt >= 0 ? process.argv[hostAt + 1]! : '127.0.0.1', () => process.stdout.write(`${JSON.stringify({ port: (server.address() as { port: number }).port })}\n`));
// the bench's process group is killed at its end; stdin is not watched
