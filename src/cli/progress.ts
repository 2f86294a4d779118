import cliProgress from 'cli-progress';

/**
 * Progress for long steps (engine builds, model loads): a bar on a terminal, plain
 * one-line-per-change text otherwise (pipes, CI logs), so logs stay readable and greppable.
 * Writes to stderr: stdout is for results (`--json`, tables, generated text).
 */
export interface Progress {
  update(value: number, message: string): void;
  stop(finalMessage?: string): void;
}

export function createProgress(label: string, total: number, stream: NodeJS.WriteStream = process.stderr): Progress {
  if (stream.isTTY) {
    const bar = new cliProgress.SingleBar(
      {
        format: `${label} [{bar}] {percentage}% | {message}`,
        barCompleteChar: '█',
        barIncompleteChar: '░',
        hideCursor: true,
        stream,
        clearOnComplete: false,
        etaBuffer: 20,
      },
      cliProgress.Presets.shades_classic,
    );
    bar.start(total, 0, { message: '' });
    return {
      update: (value, message) => bar.update(Math.min(total, value), { message: message.slice(0, Math.max(10, (stream.columns ?? 80) - label.length - 40)) }),
      stop: (finalMessage) => {
        bar.update(total, { message: finalMessage ?? '' });
        bar.stop();
      },
    };
  }
  let last = '';
  const t0 = Date.now();
  return {
    update: (value, message) => {
      if (message === last) return;
      last = message;
      stream.write(`${label} ${((Date.now() - t0) / 1000).toFixed(1).padStart(5)} s  ${Math.round((100 * value) / total)}%  ${message}\n`);
    },
    stop: (finalMessage) => {
      if (finalMessage) stream.write(`${label} ${((Date.now() - t0) / 1000).toFixed(1).padStart(5)} s  100%  ${finalMessage}\n`);
    },
  };
}
