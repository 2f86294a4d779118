import { describe, expect, it } from 'vitest';
import { natsSetting } from '../../src/cli/nats-option.ts';
import { natsConfig } from '../../src/coordinator/nats/server.ts';

describe('--nats / --no-nats', () => {
  it('neither flag asks for a local server; --no-nats for the file store; a URL is kept as given', () => {
    expect(natsSetting(undefined)).toEqual({ local: true });
    expect(natsSetting(false)).toEqual({});
    expect(natsSetting('nats://a:4222,nats://b:4222')).toEqual({ url: 'nats://a:4222,nats://b:4222' });
    expect(natsSetting('tls://nats.example:4222')).toEqual({ url: 'tls://nats.example:4222' });
    expect(natsSetting('10.0.0.2:4222')).toEqual({ url: '10.0.0.2:4222' });
  });

  it('refuses what is not a server address, naming it', () => {
    expect(() => natsSetting('http://x:4222')).toThrow(/invalid --nats "http:\/\/x:4222"/);
    expect(() => natsSetting('nats://a:4222,oops')).toThrow(/invalid --nats "oops"/);
  });
});

describe('local nats-server configuration', () => {
  it('listens on loopback (any port), keeps JetStream and its pid file in the state dir', () => {
    const conf = natsConfig({ stateDir: '/s', binary: 'nats-server' }, '/s/nats');
    expect(conf).toContain('listen: "127.0.0.1:-1"');
    expect(conf).toContain('jetstream { store_dir: "/s/nats/jetstream" }');
    expect(conf).toContain('pid_file: "/s/nats/server.pid"');
    expect(conf).not.toContain('cluster');
  });

  it('a clustered server names its routes', () => {
    const conf = natsConfig({ stateDir: '/s', binary: 'n', serverName: 'n1', port: 4222, cluster: { name: 'c', port: 6222, routes: ['nats://127.0.0.1:6223'] } }, '/s/nats');
    expect(conf).toContain('listen: "127.0.0.1:4222"');
    expect(conf).toContain('cluster { name: "c", listen: "127.0.0.1:6222", routes: ["nats://127.0.0.1:6223"] }');
  });
});
