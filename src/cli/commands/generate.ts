import { type Command, Option } from 'commander';
import { addCredentialOptions, type CredentialFlags, coordinatorClient } from '../credentials.ts';
import { OrchardError, UsageError } from '../../shared/errors.ts';
import { logprobsFromWire, MAX_TOP_LOGPROBS, type TokenLogprob } from '../../shared/generation.ts';
import { parseInteger } from '../../shared/units.ts';

interface GenerateFlags extends CredentialFlags {
  prompt: string;
  model?: string;
  maxTokens: string;
  temperature: string;
  topP?: string;
  seed: string;
  stop?: string[];
  logprobs?: string;
  coordinator?: string;
  json?: boolean;
}

function parseNumber(text: string, what: string, min: number, max: number): number {
  const n = Number(text);
  if (text.trim() === '' || !Number.isFinite(n) || n < min || n > max) throw new UsageError(`invalid ${what} "${text}": a number from ${min} to ${max}`);
  return n;
}

/**
 * `orchard generate --prompt TEXT`: a raw completion (no chat template, like llama-server's
 * /completion). Streams text to stdout; --json prints one object at the end with text, token ids
 * (with --logprobs, each token's logprob and alternatives) and timings.
 */
export function registerGenerate(program: Command): void {
  addCredentialOptions(program.command('generate'))
    .description('generate a raw completion from a loaded model (streams text)')
    .requiredOption('--prompt <text>', 'prompt text (no chat template)')
    .option('--model <name>', 'model name (default: the only loaded model)')
    .option('--max-tokens <n>', 'tokens to generate', '128')
    .option('--temperature <t>', 'sampling temperature (0 = greedy)', '0.8')
    .option('--top-p <p>', 'nucleus sampling (0 = engine default)')
    .option('--seed <s>', 'sampling seed (0 = random)', '0')
    .option('--stop <text...>', 'stop strings')
    .option('--logprobs <n>', `report each token's logprob and its n most likely alternatives (0–${MAX_TOP_LOGPROBS}; in --json)`)
    .addOption(new Option('--coordinator <host:port>', 'coordinator gRPC address (default 127.0.0.1:7420)').env('ORCHARD_COORDINATOR'))
    .option('--json', 'print one JSON object at the end: {text, tokens, timings, ...}')
    .action(async (flags: GenerateFlags) => {
      const req = {
        model: flags.model ?? '',
        prompt: flags.prompt,
        maxTokens: parseInteger(flags.maxTokens, '--max-tokens', 1, 1_000_000),
        temperature: parseNumber(flags.temperature, '--temperature', 0, 10),
        topP: flags.topP !== undefined ? parseNumber(flags.topP, '--top-p', 0, 1) : 0,
        seed: String(parseInteger(flags.seed, '--seed', 0, 0xffffffff)),
        stop: flags.stop ?? [],
        logprobs: flags.logprobs !== undefined,
        topLogprobs: flags.logprobs !== undefined ? parseInteger(flags.logprobs, '--logprobs', 0, MAX_TOP_LOGPROBS) : 0,
      };
      if (req.prompt === '') throw new UsageError('--prompt is empty');
      const client = await coordinatorClient(flags);
      const ac = new AbortController();
      const onSig = () => ac.abort();
      process.once('SIGINT', onSig);
      let text = '';
      const tokens: number[] = [];
      const logprobs: TokenLogprob[] = [];
      let done: Record<string, unknown> | undefined;
      try {
        for await (const ev of client.stream('generate', req, ac.signal)) {
          if (ev.event === 'token') {
            const t = ev.token as { text?: string; tokenIds?: number[]; logprobs?: unknown };
            text += t.text ?? '';
            tokens.push(...(t.tokenIds ?? []).map(Number));
            logprobs.push(...logprobsFromWire(t.logprobs));
            if (!flags.json && t.text) process.stdout.write(t.text);
          } else if (ev.event === 'done') done = ev.done as Record<string, unknown>;
        }
      } finally {
        process.off('SIGINT', onSig);
        client.close();
      }
      if (ac.signal.aborted) throw new OrchardError('cancelled');
      if (!done) throw new OrchardError('the stream ended without a result');
      if (flags.json) {
        process.stdout.write(
          `${JSON.stringify({ text, tokens, ...(req.logprobs ? { logprobs } : {}), finishReason: done.finishReason, promptTokens: done.promptTokens, completionTokens: done.completionTokens, timings: done.timings })}\n`,
        );
      } else process.stdout.write('\n');
    });
}
