import { Command, type Option } from 'commander';

/**
 * Every option of every command can come from the environment, through one mechanism: the
 * commands are OrchardCommands, whose addOption gives each option that names no variable of its
 * own `ORCHARD_<COMMAND PATH>_<OPTION>` (`orchard testmodel gguf --kv-heads` →
 * ORCHARD_TESTMODEL_GGUF_KV_HEADS, `--no-mdns` → …_NO_MDNS). Commander then reads it (flags >
 * env > config file > defaults, see config.ts) and `--help` prints `(env: NAME)` on the line.
 * Options that share one value across commands keep the name they set explicitly
 * (ORCHARD_API_KEY for up/coordinator/chat, ORCHARD_COORDINATOR for every client command,
 * ORCHARD_NODE_BUDGET on node and up, …).
 *
 * The variable is attached in addOption because commander wires an option's env listener when
 * the option is added; setting `envVar` later would print in --help but never be read.
 */
export class OrchardCommand extends Command {
  override createCommand(name?: string): OrchardCommand {
    return new OrchardCommand(name);
  }

  override addOption(option: Option): this {
    if (!option.envVar) option.env(envNameFor(commandPath(this), option));
    return super.addOption(option);
  }
}

/** Command names from the root's first subcommand down (`['coordinator', 'token']`). */
export function commandPath(cmd: Command): string[] {
  const names: string[] = [];
  for (let c: Command | null = cmd; c?.parent; c = c.parent) names.unshift(c.name());
  return names;
}

/** ORCHARD_<PATH>_<LONG FLAG>, upper-case, dashes as underscores. */
export function envNameFor(path: readonly string[], option: Pick<Option, 'long' | 'short' | 'name'>): string {
  const flag = (option.long ?? option.name()).replace(/^-+/, '');
  return ['ORCHARD', ...path, flag]
    .join('_')
    .toUpperCase()
    .replace(/[^A-Z0-9]+/g, '_');
}

const FALSE = /^(0|false|no|off)?$/i;

/**
 * Commander turns a boolean option on whenever its variable is defined, whatever the value; a
 * user who writes ORCHARD_SETUP_FORCE=0 or ORCHARD_NODE_NO_MDNS=false means "off". Run before
 * the action (preAction hook) on the command and its parents.
 */
export function honourFalseEnv(cmd: Command, env: NodeJS.ProcessEnv = process.env): void {
  for (let c: Command | null = cmd; c; c = c.parent) {
    for (const o of c.options) {
      if (o.required || o.optional || !o.envVar) continue;
      const key = o.attributeName();
      const raw = env[o.envVar];
      if (c.getOptionValueSource(key) === 'env' && raw !== undefined && FALSE.test(raw.trim())) c.setOptionValueWithSource(key, !!o.negate, 'env');
    }
  }
}
