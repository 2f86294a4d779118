import { execFile } from 'node:child_process';
import { chmod, mkdir, rm, stat, writeFile } from 'node:fs/promises';
import { homedir, userInfo } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import type { Command } from 'commander';
import { OrchardError, UsageError } from '../../shared/errors.ts';

/**
 * `orchard service install|uninstall [node|coordinator]`: run Orchard as a per-user service
 * that starts at login and restarts on failure — launchd on macOS (LaunchAgent in the
 * `gui/$UID` domain, because Metal needs the user's GUI session), systemd user units on Linux.
 *
 * Pure core: `serviceSpec` decides what runs, `renderLaunchdPlist` / `renderSystemdUnit` render
 * the file, `installPlan` / `uninstallPlan` list the file and the commands. The edge writes the
 * file and runs the commands (or prints them with --dry-run).
 */

export type ServiceRole = 'node' | 'coordinator';
export type ServiceManager = 'launchd' | 'systemd';

export interface ServiceSpec {
  readonly role: ServiceRole;
  /** launchd label / systemd unit stem. */
  readonly label: string;
  readonly description: string;
  /** argv[0] must be an absolute path (launchd and systemd do not search PATH). */
  readonly programArguments: readonly string[];
  readonly environment: Readonly<Record<string, string>>;
  readonly workingDirectory: string;
  /** Where launchd writes stdout/stderr (systemd uses the journal). */
  readonly logFile: string;
}

export const ROLES: readonly ServiceRole[] = ['node', 'coordinator'];
const DESCRIPTIONS: Record<ServiceRole, string> = {
  node: 'Orchard node agent (runs inference engines for the cluster)',
  coordinator: 'Orchard coordinator (discovery, placement, OpenAI API, metrics)',
};

export function serviceLabel(role: ServiceRole, manager: ServiceManager): string {
  return manager === 'launchd' ? `org.orchard.${role}` : `orchard-${role}`;
}

export interface SpecInput {
  readonly role: ServiceRole;
  readonly manager: ServiceManager;
  /** The command that runs orchard, e.g. [node, /path/bin/orchard.js] or [/usr/bin/env, orchard]. */
  readonly orchardCommand: readonly string[];
  readonly extraArgs: readonly string[];
  readonly home: string;
  readonly path: string;
}

export function serviceSpec(i: SpecInput): ServiceSpec {
  if (!i.orchardCommand[0]?.startsWith('/')) throw new UsageError(`service command must start with an absolute path, got "${i.orchardCommand[0] ?? ''}"`);
  const logDir = i.manager === 'launchd' ? join(i.home, 'Library', 'Logs', 'orchard') : join(i.home, '.local', 'state', 'orchard');
  return {
    role: i.role,
    label: serviceLabel(i.role, i.manager),
    description: DESCRIPTIONS[i.role],
    programArguments: [...i.orchardCommand, i.role, ...i.extraArgs],
    // JSON logs: launchd files and the journal are read by tools, not terminals.
    environment: { PATH: i.path, ORCHARD_LOG_FORMAT: 'json' },
    workingDirectory: i.home,
    logFile: join(logDir, `${i.role}.log`),
  };
}

/** The example files in deploy/ are these renders (a unit test keeps them in sync). */
export function exampleServiceSpec(role: ServiceRole, manager: ServiceManager): ServiceSpec {
  const home = manager === 'launchd' ? '/Users/orchard' : '/home/orchard';
  const path = manager === 'launchd' ? '/opt/homebrew/bin:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin' : '/usr/local/bin:/usr/bin:/bin';
  return serviceSpec({ role, manager, orchardCommand: ['/usr/bin/env', 'orchard'], extraArgs: [], home, path });
}

function xmlEscape(s: string): string {
  return s.replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;').replace(/"/g, '&quot;').replace(/'/g, '&apos;');
}

/** A launchd property list (XML plist 1.0) for a LaunchAgent. */
export function renderLaunchdPlist(spec: ServiceSpec): string {
  const str = (s: string) => `<string>${xmlEscape(s)}</string>`;
  const env = Object.entries(spec.environment)
    .map(([k, v]) => `\t\t<key>${xmlEscape(k)}</key>\n\t\t${str(v)}`)
    .join('\n');
  return [
    '<?xml version="1.0" encoding="UTF-8"?>',
    '<!DOCTYPE plist PUBLIC "-//Apple//DTD PLIST 1.0//EN" "http://www.apple.com/DTDs/PropertyList-1.0.dtd">',
    '<plist version="1.0">',
    '<dict>',
    `\t<key>Label</key>\n\t${str(spec.label)}`,
    `\t<key>ProgramArguments</key>\n\t<array>\n${spec.programArguments.map((a) => `\t\t${str(a)}`).join('\n')}\n\t</array>`,
    `\t<key>EnvironmentVariables</key>\n\t<dict>\n${env}\n\t</dict>`,
    `\t<key>WorkingDirectory</key>\n\t${str(spec.workingDirectory)}`,
    '\t<key>RunAtLoad</key>\n\t<true/>',
    // Restart after a crash, not after a clean exit (e.g. `orchard node` refusing a bad config
    // would otherwise loop forever).
    '\t<key>KeepAlive</key>\n\t<dict>\n\t\t<key>SuccessfulExit</key>\n\t\t<false/>\n\t</dict>',
    '\t<key>ThrottleInterval</key>\n\t<integer>10</integer>',
    // Background agents get App-Nap-style CPU and I/O throttling; inference is latency-bound.
    '\t<key>ProcessType</key>\n\t<string>Interactive</string>',
    // Time for the agent to stop its engines before launchd sends SIGKILL to the process group.
    '\t<key>ExitTimeOut</key>\n\t<integer>30</integer>',
    `\t<key>StandardOutPath</key>\n\t${str(spec.logFile)}`,
    `\t<key>StandardErrorPath</key>\n\t${str(spec.logFile)}`,
    '</dict>',
    '</plist>',
    '',
  ].join('\n');
}

/**
 * One ExecStart/Environment word, quoted the way systemd.syntax(7) reads it: double quotes
 * with C-style escapes, `%` doubled (specifier), `$` doubled (variable expansion).
 */
export function systemdQuote(word: string): string {
  const escaped = word.replace(/\\/g, '\\\\').replace(/"/g, '\\"').replace(/%/g, '%%').replace(/\$/g, '$$$$').replace(/\n/g, '\\n');
  return /^[A-Za-z0-9_@%+=:,./-]+$/.test(word) && !word.includes('%') && !word.includes('$') ? word : `"${escaped}"`;
}

/** A systemd user unit (`~/.config/systemd/user/<label>.service`). */
export function renderSystemdUnit(spec: ServiceSpec): string {
  const env = Object.entries(spec.environment).map(([k, v]) => `Environment=${systemdQuote(`${k}=${v}`)}`);
  return [
    '[Unit]',
    `Description=${spec.description}`,
    '',
    '[Service]',
    'Type=simple',
    `ExecStart=${spec.programArguments.map(systemdQuote).join(' ')}`,
    `WorkingDirectory=${systemdQuote(spec.workingDirectory)}`,
    ...env,
    'Restart=on-failure',
    'RestartSec=5',
    // The whole cgroup is the agent plus its engines: stopping the unit stops every engine, no orphans.
    'KillMode=control-group',
    'TimeoutStopSec=30',
    '',
    '[Install]',
    'WantedBy=default.target',
    '',
  ].join('\n');
}

export interface PlanStep {
  readonly argv: readonly string[];
  /** Failure is expected and harmless (e.g. unloading a service that is not loaded). */
  readonly mayFail?: boolean;
}

export interface InstallPlan {
  readonly file: string;
  readonly content: string;
  readonly commands: readonly PlanStep[];
  readonly notes: readonly string[];
}

export function unitFile(role: ServiceRole, manager: ServiceManager, home: string, xdgConfigHome: string | undefined): string {
  if (manager === 'launchd') return join(home, 'Library', 'LaunchAgents', `${serviceLabel(role, manager)}.plist`);
  return join(xdgConfigHome || join(home, '.config'), 'systemd', 'user', `${serviceLabel(role, manager)}.service`);
}

export function installPlan(spec: ServiceSpec, manager: ServiceManager, file: string, uid: number): InstallPlan {
  if (manager === 'launchd') {
    const domain = `gui/${uid}`;
    return {
      file,
      content: renderLaunchdPlist(spec),
      commands: [
        // bootstrap fails on a loaded label: unload the old definition first so a re-install applies.
        { argv: ['launchctl', 'bootout', `${domain}/${spec.label}`], mayFail: true },
        { argv: ['launchctl', 'enable', `${domain}/${spec.label}`] },
        { argv: ['launchctl', 'bootstrap', domain, file] },
      ],
      notes: [`logs: ${spec.logFile}`, `status: launchctl print ${domain}/${spec.label}`],
    };
  }
  const unit = `${spec.label}.service`;
  return {
    file,
    content: renderSystemdUnit(spec),
    commands: [
      { argv: ['systemctl', '--user', 'daemon-reload'] },
      { argv: ['systemctl', '--user', 'enable', '--now', unit] },
      // enable --now leaves an already running old version alone; restart applies the new file.
      { argv: ['systemctl', '--user', 'restart', unit] },
    ],
    notes: [
      `logs: journalctl --user -u ${unit}`,
      `status: systemctl --user status ${unit}`,
      'user services stop at logout unless lingering is on: loginctl enable-linger "$USER"',
    ],
  };
}

export function uninstallPlan(role: ServiceRole, manager: ServiceManager, file: string, uid: number): { file: string; commands: PlanStep[] } {
  if (manager === 'launchd') {
    return { file, commands: [{ argv: ['launchctl', 'bootout', `gui/${uid}/${serviceLabel(role, manager)}`], mayFail: true }] };
  }
  const unit = `${serviceLabel(role, manager)}.service`;
  return { file, commands: [{ argv: ['systemctl', '--user', 'disable', '--now', unit], mayFail: true }] };
}

/**
 * PATH for the service: the installing shell's, minus what npm/npx prepend for the duration of
 * one command (node_modules/.bin, node-gyp-bin), which would be stale or gone at the next boot.
 */
export function servicePath(path: string | undefined): string {
  const dirs = (path ?? '').split(':').filter((d) => d && !/node_modules[\\/]/.test(d) && !d.includes('node-gyp-bin'));
  const unique = [...new Set(dirs)];
  return unique.length > 0 ? unique.join(':') : '/usr/local/bin:/usr/bin:/bin';
}

export function defaultManager(platform: NodeJS.Platform): ServiceManager {
  if (platform === 'darwin') return 'launchd';
  if (platform === 'linux') return 'systemd';
  throw new UsageError(`orchard service supports macOS (launchd) and Linux (systemd), not ${platform}`);
}

function parseRole(role: string | undefined): ServiceRole {
  const r = role ?? 'node';
  if (r !== 'node' && r !== 'coordinator') throw new UsageError(`unknown service "${r}": use node or coordinator`);
  return r;
}

function parseManager(m: string | undefined): ServiceManager {
  if (m === undefined) return defaultManager(process.platform);
  if (m !== 'launchd' && m !== 'systemd') throw new UsageError(`unknown --manager "${m}": use launchd or systemd`);
  return m;
}

/** The orchard that is running now, as an absolute command: node + bin/orchard.js of this checkout. */
function currentOrchardCommand(): string[] {
  const bin = resolve(dirname(fileURLToPath(import.meta.url)), '..', '..', '..', 'bin', 'orchard.js');
  return [process.execPath, bin];
}

const run = promisify(execFile);

async function runSteps(steps: readonly PlanStep[]): Promise<void> {
  for (const s of steps) {
    const [cmd, ...args] = s.argv;
    try {
      await run(cmd!, args, { timeout: 60_000 });
    } catch (err) {
      if (s.mayFail) continue;
      const e = err as { stderr?: string; message: string };
      throw new OrchardError(`${s.argv.join(' ')} failed: ${(e.stderr || e.message).trim().split('\n')[0]}`);
    }
  }
}

function printPlan(file: string, content: string | undefined, steps: readonly PlanStep[], remove: boolean): void {
  const out: string[] = [];
  if (content !== undefined) out.push(`# would write ${file}`, content);
  for (const s of steps) out.push(`# would run: ${s.argv.join(' ')}${s.mayFail ? '   (failure ignored)' : ''}`);
  if (remove) out.push(`# would remove ${file}`);
  process.stdout.write(`${out.join('\n')}\n`);
}

interface ServiceFlags {
  dryRun?: boolean;
  manager?: string;
}

export function registerService(program: Command): void {
  const service = program.command('service').description('run orchard node / coordinator as a login service (launchd on macOS, systemd --user on Linux)');
  service
    .command('install')
    .description('write the service file for node (default) or coordinator and start it; arguments after -- go to the service')
    .argument('[role]', 'node or coordinator', 'node')
    .argument('[args...]', 'arguments for `orchard <role>`, after --, e.g. -- --join 10.0.0.1:7420 --token-file /etc/orchard/join-token')
    .option('--dry-run', 'print the file and the commands, change nothing')
    .option('--manager <launchd|systemd>', 'service manager (default: launchd on macOS, systemd on Linux)')
    .action(async (roleArg: string | undefined, rest: string[], flags: ServiceFlags) => {
      // `install -- --join X`: commander hands the first word after -- to [role].
      const roleGiven = roleArg !== undefined && !roleArg.startsWith('-');
      const role = parseRole(roleGiven ? roleArg : undefined);
      const args = roleGiven || roleArg === undefined ? rest : [roleArg, ...rest];
      const manager = parseManager(flags.manager);
      const home = homedir();
      const spec = serviceSpec({
        role,
        manager,
        orchardCommand: currentOrchardCommand(),
        extraArgs: args,
        home,
        path: servicePath(process.env.PATH),
      });
      const file = unitFile(role, manager, home, process.env.XDG_CONFIG_HOME);
      const plan = installPlan(spec, manager, file, userInfo().uid);
      if (flags.dryRun) {
        printPlan(plan.file, plan.content, plan.commands, false);
        return;
      }
      await mkdir(dirname(plan.file), { recursive: true });
      await mkdir(dirname(spec.logFile), { recursive: true });
      // 0600: the arguments may hold the cluster join token.
      await writeFile(plan.file, plan.content, { mode: 0o600 });
      await chmod(plan.file, 0o600);
      await runSteps(plan.commands);
      process.stdout.write(`installed ${spec.label}: ${plan.file}\n${plan.notes.map((n) => `  ${n}`).join('\n')}\n`);
    });
  service
    .command('uninstall')
    .description('stop and remove the service for node and coordinator, or only the one named')
    .argument('[role]', 'node or coordinator (default: both)')
    .option('--dry-run', 'print the commands, change nothing')
    .option('--manager <launchd|systemd>', 'service manager (default: launchd on macOS, systemd on Linux)')
    .action(async (roleArg: string | undefined, flags: ServiceFlags) => {
      const roles = roleArg === undefined ? ROLES : [parseRole(roleArg)];
      const manager = parseManager(flags.manager);
      const removed: string[] = [];
      for (const role of roles) {
        const file = unitFile(role, manager, homedir(), process.env.XDG_CONFIG_HOME);
        const exists = await stat(file).then(
          () => true,
          () => false,
        );
        if (!exists && roleArg === undefined) continue;
        if (!exists) throw new OrchardError(`no ${role} service installed (${file} does not exist)`);
        const plan = uninstallPlan(role, manager, file, userInfo().uid);
        if (flags.dryRun) {
          printPlan(file, undefined, plan.commands, true);
          continue;
        }
        await runSteps(plan.commands);
        await rm(file, { force: true });
        if (manager === 'systemd') await runSteps([{ argv: ['systemctl', '--user', 'daemon-reload'], mayFail: true }]);
        removed.push(serviceLabel(role, manager));
      }
      if (!flags.dryRun) process.stdout.write(removed.length > 0 ? `removed ${removed.join(', ')}\n` : 'no orchard service installed\n');
    });
}
