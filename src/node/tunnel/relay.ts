import type { Socket } from 'node:net';

/** Payload bytes through one tunnel, counted on the plaintext side (TLS framing excluded). */
export interface TunnelBytes {
  /** head → worker engine (requests, tensors). */
  toEngine: number;
  /** worker engine → head (results). */
  fromEngine: number;
}

/**
 * How much one direction may hold unsent before its source is paused. `pipe` pauses at the
 * destination's highWaterMark (16 KiB): every 64 KiB read then became a readStop/readStart pair
 * and a weights load stalled on it. A few MiB keeps a load streaming and still bounds what a
 * slow reader can make the agent buffer (per direction, per connection; checked once per
 * event-loop turn, so it can be overshot by one turn's reads, at most 32 × 64 KiB).
 */
export const RELAY_MAX_BUFFERED_BYTES = 4 * 2 ** 20;

/**
 * Join two sockets both ways, with backpressure (a slow reader pauses the writer once
 * RELAY_MAX_BUFFERED_BYTES wait) and half-close (one side's FIN becomes the other side's end(),
 * the reverse direction keeps flowing until it ends too). An error or abrupt close on either side
 * destroys both, so a dead engine or peer never leaves the other half open. Counters are updated
 * per chunk.
 */
export function relay(headSide: Socket, engineSide: Socket, bytes: TunnelBytes): Promise<void> {
  forward(headSide, engineSide, (n) => {
    bytes.toEngine += n;
  });
  forward(engineSide, headSide, (n) => {
    bytes.fromEngine += n;
  });
  return new Promise((resolve) => {
    let open = 2;
    // a side that closed before both of its directions finished cleanly (error, reset, destroy)
    // takes the other side down with it; a clean close already ended the other side
    const closed = (side: Socket, other: Socket) => () => {
      if (!side.readableEnded || !side.writableFinished) other.destroy();
      if (--open === 0) resolve();
    };
    headSide.once('close', closed(headSide, engineSide));
    engineSide.once('close', closed(engineSide, headSide));
    // errors are reported through 'close' (hadError); listening here keeps them from being unhandled
    headSide.on('error', () => engineSide.destroy());
    engineSide.on('error', () => headSide.destroy());
  });
}

/**
 * One direction. A TLS socket hands decrypted bytes over one 16 KiB record at a time: written
 * one by one, every record cost its own write syscall. Chunks are corked instead and leave
 * together in one writev at the end of the event loop's poll phase (setImmediate), which runs
 * before the loop sleeps again, so nothing waits for more input. Measured with strace on 200 MiB
 * through the worker end: 14.5 k write syscalls with pipe, 2.5 k (writes + writevs) with this.
 */
function forward(from: Socket, to: Socket, count: (n: number) => void): void {
  let corked = false;
  const flush = () => {
    corked = false;
    to.uncork();
    if (to.writableLength > RELAY_MAX_BUFFERED_BYTES && !from.isPaused()) {
      from.pause();
      to.once('drain', () => from.resume());
    }
  };
  from.on('data', (chunk: Buffer) => {
    count(chunk.length);
    if (to.destroyed || to.writableEnded) return;
    if (!corked) {
      corked = true;
      to.cork();
      setImmediate(flush);
    }
    to.write(chunk);
  });
  from.once('end', () => {
    if (!to.destroyed && !to.writableEnded) to.end();
  });
  from.resume();
}
