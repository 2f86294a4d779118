import { type Command, CommanderError, Option } from 'commander';
import { OrchardError, UsageError } from '../shared/errors.ts';
import { loadConfig } from './config.ts';
import { honourFalseEnv, OrchardCommand } from './env.ts';
import { registerCluster } from './commands/cluster.ts';
import { registerCoordinator } from './commands/coordinator.ts';
import { registerChat } from './commands/chat.ts';
import { registerDemo } from './commands/demo.ts';
import { registerGenerate } from './commands/generate.ts';
import { registerLoad } from './commands/load.ts';
import { registerNode } from './commands/node.ts';
import { registerPlan } from './commands/plan.ts';
import { registerService } from './commands/service.ts';
import { registerSetup } from './commands/setup.ts';
import { registerStatus } from './commands/status.ts';
import { registerEvents } from './commands/events.ts';
import { registerTestmodel } from './commands/testmodel.ts';
import { registerUnload } from './commands/unload.ts';
import { registerRebalance } from './commands/rebalance.ts';
import { registerUp } from './commands/up.ts';

/**
 * The `orchard` command tree. Each command lives in `commands/<name>.ts` and exports
 * `register<Name>(program)`; this file only assembles them and owns the shared conventions:
 * exit 0 ok, 1 failure, 2 usage; one-line errors; stack traces only with --debug.
 */
export function buildProgram(): Command {
  const program = new OrchardCommand('orchard')
    .description('Run one large language model across several Apple Silicon Macs.')
    .version(process.env.npm_package_version ?? '0.1.0', '-V, --version')
    .addOption(new Option('--debug', 'print stack traces and debug logs').env('ORCHARD_DEBUG'))
    .addOption(new Option('--config <file>', 'config file (default ~/.config/orchard/config.json; precedence: flags > ORCHARD_* env > file > defaults)').env('ORCHARD_CONFIG'))
    .showSuggestionAfterError(true)
    .configureHelp({ sortSubcommands: false })
    .hook('preAction', (_root, actionCommand) => honourFalseEnv(actionCommand));
  program.exitOverride();
  registerSetup(program);
  registerTestmodel(program);
  registerService(program);
  registerNode(program);
  registerCoordinator(program);
  registerCluster(program);
  registerStatus(program);
  registerEvents(program);
  registerLoad(program);
  registerUnload(program);
  registerRebalance(program);
  registerGenerate(program);
  registerPlan(program);
  registerDemo(program);
  registerUp(program);
  registerChat(program);
  for (const cmd of program.commands) inheritConventions(cmd);
  return program;
}

function inheritConventions(cmd: Command): void {
  cmd.exitOverride();
  cmd.showSuggestionAfterError(true);
  for (const sub of cmd.commands) inheritConventions(sub);
}

/** Wrap an async action so the CLI conventions hold for every command. */
export function action<A extends unknown[]>(fn: (...args: A) => Promise<void> | void): (...args: A) => Promise<void> {
  return async (...args: A) => {
    await fn(...args);
  };
}

export async function runCli(argv: string[]): Promise<number> {
  const program = buildProgram();
  const debug = argv.includes('--debug') || !!process.env.ORCHARD_DEBUG;
  try {
    await loadConfig(program, argv);
    await program.parseAsync(argv, { from: 'user' });
    return typeof process.exitCode === 'number' ? process.exitCode : 0;
  } catch (err) {
    if (err instanceof CommanderError) {
      // help and version are "errors" to commander; they already printed their text.
      if (err.code === 'commander.helpDisplayed' || err.code === 'commander.version' || err.code === 'commander.help') return 0;
      return 2;
    }
    if (err instanceof OrchardError) {
      process.stderr.write(`orchard: ${err.message}\n`);
      if (debug && err.stack) process.stderr.write(`${err.stack}\n`);
      return err.exitCode;
    }
    const message = err instanceof Error ? err.message : String(err);
    process.stderr.write(`orchard: unexpected error: ${message}\n`);
    if (debug && err instanceof Error && err.stack) process.stderr.write(`${err.stack}\n`);
    else process.stderr.write('orchard: run again with --debug for details\n');
    return 1;
  }
}

export { UsageError };
