import { createInterface } from 'node:readline/promises';
import { type Command, Option } from 'commander';
import { DEFAULT_COORDINATOR_HTTP_PORT } from '../../coordinator/api/client.ts';
import { OrchardError, UsageError } from '../../shared/errors.ts';
import { parseInteger } from '../../shared/units.ts';
import { type ApiClientOptions, apiJson, apiSse } from '../api-client.ts';
import { addCredentialOptions, type CredentialFlags, resolveApiKey } from '../credentials.ts';

interface ChatFlags extends CredentialFlags {
  url: string;
  model?: string;
  system?: string;
  temperature: string;
  maxTokens: string;
}

interface Message {
  role: 'system' | 'user' | 'assistant';
  content: string;
}

/**
 * `orchard chat`: a terminal chat over the coordinator's OpenAI API — streaming, multi-turn
 * (the whole history goes with every request, as with any OpenAI client), `/exit` to leave,
 * `/reset` to forget. Ctrl-C while the model answers stops that answer (the request is
 * cancelled, freeing the slot); Ctrl-C at the prompt leaves. Without a terminal it reads one
 * user turn per line from stdin, so it can be scripted.
 */
export function registerChat(program: Command): void {
  addCredentialOptions(program.command('chat'))
    .description('chat with a loaded model (streaming, multi-turn) over the OpenAI API')
    .addOption(new Option('--url <url>', 'coordinator HTTP base URL').default(`http://127.0.0.1:${DEFAULT_COORDINATOR_HTTP_PORT}`).env('ORCHARD_URL'))
    .option('--model <name>', 'model to talk to (default: the only loaded one)')
    .option('--system <text>', 'system prompt')
    .option('--temperature <t>', 'sampling temperature (0 = greedy)', '0.7')
    .option('--max-tokens <n>', 'longest answer in tokens', '512')
    .addHelpText(
      'after',
      `
Examples:
  $ orchard chat
  $ orchard chat --model llama-3.1-70b --system "Answer in one sentence."
  $ echo "What is RPC?" | orchard chat --temperature 0

Inside: /exit (or Ctrl-D) leaves, /reset clears the history.`,
    )
    .action(async (flags: ChatFlags) => {
      await runChat(flags);
    });
}

async function pickModel(api: ApiClientOptions, wanted: string | undefined): Promise<string> {
  const list = await apiJson<{ data: { id: string; orchard?: { state?: string } }[] }>(api, 'GET', '/v1/models');
  const ready = list.data.filter((m) => (m.orchard?.state ?? 'ready') === 'ready').map((m) => m.id);
  if (wanted) {
    if (!list.data.some((m) => m.id === wanted)) throw new OrchardError(`no model named "${wanted}" (loaded: ${ready.join(', ') || 'none'})`);
    return wanted;
  }
  if (ready.length === 1) return ready[0]!;
  if (ready.length === 0) throw new OrchardError('no model is loaded: run `orchard load MODEL.gguf` first');
  throw new UsageError(`several models are loaded (${ready.join(', ')}): choose one with --model`);
}

async function runChat(flags: ChatFlags): Promise<void> {
  const temperature = Number(flags.temperature);
  if (!Number.isFinite(temperature) || temperature < 0 || temperature > 2) throw new UsageError(`invalid --temperature "${flags.temperature}": 0–2`);
  const maxTokens = parseInteger(flags.maxTokens, '--max-tokens', 1, 1_000_000);
  const api: ApiClientOptions = { baseUrl: flags.url.replace(/\/+$/, '').replace(/\/v1$/, ''), apiKey: await resolveApiKey(flags) };
  const model = await pickModel(api, flags.model);
  const tty = !!process.stdin.isTTY;
  const history: Message[] = flags.system ? [{ role: 'system', content: flags.system }] : [];
  const rl = createInterface({ input: process.stdin, output: process.stdout, terminal: tty });
  if (tty) process.stdout.write(`chatting with ${model} at ${api.baseUrl} — /exit to leave, /reset to clear\n`);

  let answering: AbortController | undefined;
  rl.on('SIGINT', () => {
    if (answering) answering.abort();
    else rl.close();
  });
  // The line iterator buffers: piped input that arrives while an answer streams is not lost.
  const lines = rl[Symbol.asyncIterator]();
  rl.setPrompt('\n› ');
  try {
    for (;;) {
      if (tty) rl.prompt();
      const next = await lines.next();
      if (next.done) break; // Ctrl-D, Ctrl-C at the prompt, end of stdin
      const line: string = next.value;
      const text = line.trim();
      if (text === '') continue;
      if (text === '/exit' || text === '/quit') break;
      if (text === '/reset') {
        history.splice(flags.system ? 1 : 0);
        process.stdout.write('(history cleared)\n');
        continue;
      }
      history.push({ role: 'user', content: text });
      answering = new AbortController();
      let reply = '';
      try {
        for await (const c of apiSse(api, '/v1/chat/completions', { model, messages: history, stream: true, temperature, max_tokens: maxTokens }, answering.signal)) {
          const delta = (c.choices as { delta?: { content?: string } }[] | undefined)?.[0]?.delta?.content ?? '';
          reply += delta;
          process.stdout.write(delta);
        }
        process.stdout.write('\n');
        history.push({ role: 'assistant', content: reply });
      } catch (err) {
        if (!answering.signal.aborted) {
          history.pop(); // the turn failed: do not send it again next time
          throw err;
        }
        process.stdout.write(' [stopped]\n');
        history.push({ role: 'assistant', content: reply });
      } finally {
        answering = undefined;
      }
    }
  } finally {
    rl.close();
  }
}
