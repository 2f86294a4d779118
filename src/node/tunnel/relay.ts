import type { Socket } from 'node:net';

/** Payload bytes through one tunnel, counted on the plaintext side (TLS framing excluded). */
export interface TunnelBytes {
  /** head → worker engine (requests, tensors). */
  toEngine: number;
  /** worker engine → head (results). */
  fromEngine: number;
}

/**
 * Join two sockets both ways. `pipe` gives backpressure (a slow reader pauses the writer) and
 * half-close (one side's FIN becomes the other side's end(), the reverse direction keeps
 * flowing until it ends too). An error or abrupt close on either side destroys both, so a
 * dead engine or peer never leaves the other half open. Counters are updated per chunk.
 */
export function relay(headSide: Socket, engineSide: Socket, bytes: TunnelBytes): Promise<void> {
  headSide.on('data', (d: Buffer) => {
    bytes.toEngine += d.length;
  });
  engineSide.on('data', (d: Buffer) => {
    bytes.fromEngine += d.length;
  });
  headSide.pipe(engineSide);
  engineSide.pipe(headSide);
  return new Promise((resolve) => {
    let open = 2;
    // a side that closed before both of its directions finished cleanly (error, reset, destroy)
    // takes the other side down with it; a clean close already ended the other side via pipe
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
