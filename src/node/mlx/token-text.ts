import type { DoneMessage, TokenMessage } from './protocol.ts';

/**
 * The streamed text of an MLX generation, decoded from each token's raw bytes as llama-server
 * streams it: a token that ends inside a UTF-8 sequence (byte-level tokenizers split characters
 * over tokens) releases nothing of that character until a later token completes it, and bytes
 * that can never form a character become U+FFFD once that is certain. The WHATWG TextDecoder's
 * streaming mode is exactly that rule; a leading byte-order mark is text like any other here.
 */
export class TokenTextDecoder {
  readonly #decoder = new TextDecoder('utf-8', { ignoreBOM: true });
  /** Whether any token carried its bytes (else the worker's own text stands). */
  #used = false;

  /** The complete characters this token's bytes finish (possibly none). */
  push(bytes: Uint8Array): string {
    this.#used = true;
    return this.#decoder.decode(bytes, { stream: true });
  }

  /** At the end: what is still held (an unfinished character is U+FFFD). */
  flush(): string {
    return this.#decoder.decode();
  }

  /** A worker token line with its text decoded from its bytes, when it has them. */
  token(t: TokenMessage): TokenMessage {
    return t.bytes === undefined ? t : { ...t, text: this.push(Buffer.from(t.bytes, 'hex')) };
  }

  /** The done line with the held bytes as its tail, when the text came from bytes. */
  done(d: DoneMessage): DoneMessage {
    return this.#used ? { ...d, text_tail: this.flush() } : d;
  }
}
