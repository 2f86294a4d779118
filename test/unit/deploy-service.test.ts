import { execFileSync, spawnSync } from 'node:child_process';
import { chmodSync, existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import {
  exampleServiceSpec,
  installPlan,
  renderLaunchdPlist,
  renderSystemdUnit,
  type ServiceSpec,
  serviceSpec,
  servicePath,
  systemdQuote,
  uninstallPlan,
  unitFile,
} from '../../src/cli/commands/service.ts';

/**
 * Service files are checked by real parsers: Python's plistlib (the same XML plist 1.0 format
 * plutil reads; plutil itself only exists on macOS) and `systemd-analyze verify` (Debian's
 * systemd package). Both are required on the CI machine (.ci/run installs python3 and systemd).
 */
const ROOT = resolve(import.meta.dirname, '..', '..');
const tmp = mkdtempSync(join(tmpdir(), 'orchard-deploy-'));
afterAll(() => rmSync(tmp, { recursive: true, force: true }));

function parsePlist(xml: string): unknown {
  const r = spawnSync('python3', ['-c', 'import sys, plistlib, json; print(json.dumps(plistlib.loads(sys.stdin.buffer.read(), fmt=plistlib.FMT_XML)))'], {
    input: xml,
    encoding: 'utf8',
  });
  if (r.error) throw r.error;
  if (r.status !== 0) throw new Error(`plist rejected: ${r.stderr.trim().split('\n').at(-1)}`);
  return JSON.parse(r.stdout);
}

function verifyUnit(name: string, text: string): { ok: boolean; output: string } {
  const dir = mkdtempSync(join(tmp, 'unit-'));
  const file = join(dir, name);
  writeFileSync(file, text);
  // --user verification needs a runtime dir; the test machine has no user session.
  const runtime = mkdtempSync(join(tmp, 'xdg-runtime-'));
  chmodSync(runtime, 0o700);
  const r = spawnSync('systemd-analyze', ['verify', '--user', '--man=no', file], {
    encoding: 'utf8',
    env: { ...process.env, SYSTEMD_LOG_COLOR: '0', XDG_RUNTIME_DIR: runtime },
  });
  if (r.error) throw r.error;
  // verify prints warnings about unrelated system units on some machines; only lines about our file count.
  const own = `${r.stdout}${r.stderr}`
    .split('\n')
    .filter((l) => l.includes(name))
    .join('\n');
  return { ok: r.status === 0 && own === '', output: `${r.stdout}${r.stderr}` };
}

/** What `orchard service install` renders on this machine: absolute node + this checkout's bin/orchard.js. */
function realSpec(role: 'node' | 'coordinator', manager: 'launchd' | 'systemd', extraArgs: string[] = []): ServiceSpec {
  return serviceSpec({ role, manager, orchardCommand: [process.execPath, join(ROOT, 'bin', 'orchard.js')], extraArgs, home: tmp, path: '/usr/local/bin:/usr/bin:/bin' });
}

const NASTY = ['--token', `a b"c'd<e>&f$g%h\\i`, '--name', 'Jane’s Mac'];

describe('launchd plist', () => {
  it('is a valid XML plist with the launchd keys, arguments preserved exactly', () => {
    const spec = realSpec('node', 'launchd', NASTY);
    const plist = parsePlist(renderLaunchdPlist(spec)) as Record<string, unknown>;
    expect(plist).toMatchObject({
      Label: 'org.orchard.node',
      ProgramArguments: [process.execPath, join(ROOT, 'bin', 'orchard.js'), 'node', ...NASTY],
      RunAtLoad: true,
      KeepAlive: { SuccessfulExit: false },
      ProcessType: 'Interactive',
      EnvironmentVariables: { PATH: '/usr/local/bin:/usr/bin:/bin', ORCHARD_LOG_FORMAT: 'json' },
      StandardErrorPath: join(tmp, 'Library', 'Logs', 'orchard', 'node.log'),
    });
    expect(plist['ThrottleInterval']).toBe(10);
  });

  it('the validator rejects a broken plist (the check can fail)', () => {
    const good = renderLaunchdPlist(realSpec('coordinator', 'launchd'));
    expect(() => parsePlist(good.replace('<true/>', '<true>'))).toThrow(/plist rejected/);
    expect(() => parsePlist(good.replace('</array>', ''))).toThrow(/plist rejected/);
  });

  it('install bootstraps into the gui domain after unloading an old copy; uninstall boots out', () => {
    const spec = realSpec('node', 'launchd');
    const file = unitFile('node', 'launchd', '/Users/x', undefined);
    expect(file).toBe('/Users/x/Library/LaunchAgents/org.orchard.node.plist');
    const plan = installPlan(spec, 'launchd', file, 501);
    expect(plan.commands.map((c) => c.argv.join(' '))).toEqual([
      'launchctl bootout gui/501/org.orchard.node',
      'launchctl enable gui/501/org.orchard.node',
      `launchctl bootstrap gui/501 ${file}`,
    ]);
    expect(plan.commands[0]!.mayFail).toBe(true);
    expect(uninstallPlan('node', 'launchd', file, 501).commands.map((c) => c.argv.join(' '))).toEqual(['launchctl bootout gui/501/org.orchard.node']);
  });
});

describe('systemd user unit', () => {
  it('passes systemd-analyze verify for node and coordinator, with awkward arguments', () => {
    for (const role of ['node', 'coordinator'] as const) {
      const spec = realSpec(role, 'systemd', NASTY);
      const r = verifyUnit(`${spec.label}.service`, renderSystemdUnit(spec));
      expect(r.ok, r.output).toBe(true);
    }
  });

  it('the verifier rejects a broken unit (the check can fail)', () => {
    const text = renderSystemdUnit(realSpec('node', 'systemd')).replace(/^ExecStart=.*$/m, 'ExecStart=relative/orchard node');
    expect(verifyUnit('orchard-node.service', text).ok).toBe(false);
    const bogus = renderSystemdUnit(realSpec('node', 'systemd')).replace('Restart=on-failure', 'Restart=sometimes');
    expect(verifyUnit('orchard-node.service', bogus).ok).toBe(false);
  });

  it('quotes words the way systemd reads them', () => {
    expect(systemdQuote('/usr/bin/node')).toBe('/usr/bin/node');
    expect(systemdQuote('--join=10.0.0.1:7700')).toBe('--join=10.0.0.1:7700');
    expect(systemdQuote('a b')).toBe('"a b"');
    expect(systemdQuote('50%')).toBe('"50%%"');
    expect(systemdQuote('$HOME')).toBe('"$$HOME"');
    expect(systemdQuote('say "hi"\\')).toBe('"say \\"hi\\"\\\\"');
  });

  it('systemd splits ExecStart back into exactly the arguments given', () => {
    // systemd accepts the line (test above); this reads it back per systemd.syntax(7) quoting
    // (C escapes in double quotes, %% and $$ unescaped) to show no argument is split or altered.
    const line = renderSystemdUnit(realSpec('node', 'systemd', NASTY)).match(/^ExecStart=(.*)$/m)![1]!;
    const words: string[] = [];
    for (const m of line.matchAll(/"((?:[^"\\]|\\.)*)"|(\S+)/g)) {
      const raw = m[1] !== undefined ? m[1].replace(/\\(.)/g, '$1') : m[2]!;
      words.push(raw.replace(/%%/g, '%').replace(/\$\$/g, '$'));
    }
    expect(words.slice(2)).toEqual(['node', ...NASTY]);
  });

  it('install reloads, enables and restarts; files go under XDG_CONFIG_HOME', () => {
    expect(unitFile('coordinator', 'systemd', '/home/x', undefined)).toBe('/home/x/.config/systemd/user/orchard-coordinator.service');
    expect(unitFile('node', 'systemd', '/home/x', '/cfg')).toBe('/cfg/systemd/user/orchard-node.service');
    const plan = installPlan(realSpec('node', 'systemd'), 'systemd', '/f', 1000);
    expect(plan.commands.map((c) => c.argv.join(' '))).toEqual([
      'systemctl --user daemon-reload',
      'systemctl --user enable --now orchard-node.service',
      'systemctl --user restart orchard-node.service',
    ]);
    expect(plan.notes.join('\n')).toContain('enable-linger');
    expect(uninstallPlan('node', 'systemd', '/f', 1000).commands[0]!.argv).toEqual(['systemctl', '--user', 'disable', '--now', 'orchard-node.service']);
  });

  it('the service PATH drops npm/npx per-command directories and duplicates', () => {
    expect(servicePath('/w/node_modules/.bin:/usr/lib/node_modules/npm/node_modules/@npmcli/run-script/lib/node-gyp-bin:/opt/homebrew/bin:/usr/bin:/usr/bin')).toBe(
      '/opt/homebrew/bin:/usr/bin',
    );
    expect(servicePath(undefined)).toBe('/usr/local/bin:/usr/bin:/bin');
  });

  it('refuses a relative command', () => {
    expect(() => serviceSpec({ role: 'node', manager: 'systemd', orchardCommand: ['orchard'], extraArgs: [], home: '/h', path: '/bin' })).toThrow(/absolute/);
  });
});

describe('deploy/ files', () => {
  it('the example units in deploy/ are exactly what the renderers produce, and valid', () => {
    for (const role of ['node', 'coordinator'] as const) {
      const l = exampleServiceSpec(role, 'launchd');
      const plistText = readFileSync(join(ROOT, 'deploy', 'launchd', `${l.label}.plist`), 'utf8');
      expect(plistText).toBe(renderLaunchdPlist(l));
      expect(parsePlist(plistText)).toMatchObject({ Label: l.label, ProgramArguments: ['/usr/bin/env', 'orchard', role] });
      const s = exampleServiceSpec(role, 'systemd');
      const unitText = readFileSync(join(ROOT, 'deploy', 'systemd', `${s.label}.service`), 'utf8');
      expect(unitText).toBe(renderSystemdUnit(s));
      const r = verifyUnit(`${s.label}.service`, unitText);
      expect(r.ok, r.output).toBe(true);
    }
  });

  it('both prometheus.yml files pass promtool and discover targets from the coordinator route', () => {
    for (const f of ['deploy/prometheus/prometheus.yml', 'deploy/monitoring/prometheus.yml']) {
      const out = execFileSync('promtool', ['check', 'config', join(ROOT, f)], { encoding: 'utf8' });
      expect(out).toContain('SUCCESS');
      const text = readFileSync(join(ROOT, f), 'utf8');
      expect(text).toMatch(/http_sd_configs:\s*\n\s*- url: http:\/\/[^/\s]+\/v1\/prometheus\/targets\s*$/m);
    }
  });

  it('the compose stack mounts the provisioning, the dashboards and the Prometheus config that exist', () => {
    const compose = readFileSync(join(ROOT, 'deploy/monitoring/compose.yaml'), 'utf8');
    const mounts = [...compose.matchAll(/^\s*- (\.{1,2}\/[^:]+):([^:\s]+)(?::ro)?\s*$/gm)].map((m) => ({ src: m[1]!, dst: m[2]! }));
    expect(mounts.map((m) => m.src).sort()).toEqual(['../../dashboards', '../grafana/provisioning', './prometheus.yml']);
    for (const m of mounts) expect(existsSync(join(ROOT, 'deploy/monitoring', m.src)), m.src).toBe(true);
    // The dashboard provider reads where compose mounts the dashboards.
    const provider = readFileSync(join(ROOT, 'deploy/grafana/provisioning/dashboards/orchard.yaml'), 'utf8');
    const providerPath = provider.match(/^\s*path:\s*(\S+)/m)![1]!;
    expect(mounts.find((m) => m.src === '../../dashboards')!.dst).toBe(providerPath);
    // Prometheus is reachable under the name the datasource uses.
    const ds = readFileSync(join(ROOT, 'deploy/grafana/provisioning/datasources/orchard.yaml'), 'utf8');
    expect(ds).toMatch(/url: http:\/\/prometheus:9090/);
    expect(compose).toMatch(/^ {2}prometheus:$/m);
  });
});

describe('orchard service (CLI)', () => {
  const cli = (args: string[]) =>
    spawnSync(process.execPath, [join(ROOT, 'bin', 'orchard.js'), 'service', ...args], {
      encoding: 'utf8',
      env: { ...process.env, HOME: tmp, XDG_CONFIG_HOME: join(tmp, 'cfg') },
      timeout: 60_000,
    });

  it('install --dry-run prints the unit and the commands, passes arguments after --, writes nothing', () => {
    const r = cli(['install', 'coordinator', '--dry-run', '--manager', 'systemd', '--', '--http-port', '8420']);
    expect(r.stderr).toBe('');
    expect(r.status).toBe(0);
    const file = join(tmp, 'cfg', 'systemd', 'user', 'orchard-coordinator.service');
    expect(r.stdout).toContain(`# would write ${file}`);
    expect(r.stdout).toMatch(/^ExecStart=\S+ \S+bin\/orchard\.js coordinator --http-port 8420$/m);
    expect(r.stdout).toContain('# would run: systemctl --user enable --now orchard-coordinator.service');
    expect(existsSync(file)).toBe(false);
  });

  it('install with only -- arguments means the node service', () => {
    const r = cli(['install', '--dry-run', '--manager', 'launchd', '--', '--join', '10.0.0.1:50150']);
    expect(r.status).toBe(0);
    const plist = r.stdout.slice(r.stdout.indexOf('<?xml'), r.stdout.indexOf('</plist>') + '</plist>'.length);
    expect(parsePlist(plist)).toMatchObject({ Label: 'org.orchard.node', ProgramArguments: [process.execPath, join(ROOT, 'bin', 'orchard.js'), 'node', '--join', '10.0.0.1:50150'] });
  });

  it('rejects an unknown role or manager with a usage error', () => {
    const bad = cli(['install', 'worker', '--dry-run']);
    expect(bad.status).toBe(2);
    expect(bad.stderr).toContain('unknown service "worker"');
    expect(cli(['install', '--dry-run', '--manager', 'upstart']).status).toBe(2);
  });

  it('uninstall of a service that is not installed fails clearly and changes nothing', () => {
    const r = cli(['uninstall', 'node', '--manager', 'systemd']);
    expect(r.status).toBe(1);
    expect(r.stderr).toContain('no node service installed');
  });
});
