import { join } from 'node:path';
import { createClusterCa, createKeyAndCsr, issueCertificate } from '../shared/pki/certificates.ts';
import type { NodeCredentials } from '../shared/pki/store.ts';
import { EnginePorts } from './tunnel/engine-ports.ts';
import { type TunnelForwarder, startTunnelForwarder } from './tunnel/forwarder.ts';
import { measureLink } from './tunnel/link-probe.ts';
import { startTunnelListener } from './tunnel/listener.ts';
import { findTunnelRelay, startNativeForwarder } from './tunnel/native-forwarder.ts';
import { startNativeListener } from './tunnel/native-listener.ts';

/**
 * A tunnel from this machine to itself, built exactly as two agents build one between them
 * (engine-tunnels.ts): the worker side's listener (TLS 1.3, cluster certificates, engine ports
 * it registered) in front of an rpc-server's Unix-domain socket, the head side's forwarder on a
 * Unix-domain socket for llama-server's `--rpc`, both native relays when `orchard setup` built
 * them (findTunnelRelay), else Node's. The calibration runs a stage through it to measure what
 * a tunnelled boundary costs a decoded token on this machine beyond what the agents' link probe
 * sees (calibrate.ts), and probes it with that same probe.
 *
 * The certificates are a throwaway cluster's, made for this tunnel and never written anywhere:
 * the tunnel accepts nobody but its own two ends, and it listens on 127.0.0.1 only.
 */
export interface LoopbackTunnel {
  /** The forwarder's socket, for llama-server's `--rpc unix:<path>`. */
  readonly socket: string;
  /** The agents' link probe over this tunnel (link-probe.ts): median round trip of 1-byte frames. */
  probeRttSeconds(): Promise<number>;
  /**
   * Gone now, as the calibration engine's processes go (SIGKILL, synchronously): the native
   * relays would exit on their own once their stdin closes, but not before a caller that exits
   * right after stopping is gone (`orchard demo`).
   */
  stop(): void;
}

const HOST = '127.0.0.1';

async function credentialsFor(ca: Awaited<ReturnType<typeof createClusterCa>>, id: string): Promise<NodeCredentials> {
  const { keyPem, csrPem } = await createKeyAndCsr(id);
  const { certPem } = await issueCertificate(ca, csrPem, { role: 'node', expectId: id });
  return { keyPem, certPem, caCertPem: ca.certPem };
}

/** Tunnel to the rpc-server registered as `enginePort` and listening on `rpcSocket`; the forwarder's socket goes in `socketDir`. */
export async function startLoopbackTunnel(enginePort: number, rpcSocket: string, socketDir: string, env: NodeJS.ProcessEnv = process.env): Promise<LoopbackTunnel> {
  const ca = await createClusterCa('calibration');
  const worker = await credentialsFor(ca, 'calibration-worker');
  const head = await credentialsFor(ca, 'calibration-head');
  const enginePorts = new EnginePorts();
  enginePorts.register(enginePort, 'calibration', rpcSocket);
  const relay = findTunnelRelay(env);
  const common = { host: HOST, port: 0, credentials: worker, enginePorts };
  const listener = relay ? await startNativeListener(relay, { ...common, revoked: new Set() }) : await startTunnelListener(common);
  let forwarder: TunnelForwarder;
  try {
    const o = { remote: { host: HOST, port: listener.port }, enginePort, expectPeer: { id: 'calibration-worker' }, credentials: head, localSocket: join(socketDir, `fwd-${enginePort}.sock`) };
    forwarder = relay ? await startNativeForwarder(relay, o) : await startTunnelForwarder(o);
  } catch (err) {
    await listener.close();
    throw err;
  }
  return {
    socket: forwarder.socket!,
    probeRttSeconds: async () => (await measureLink({ remote: { host: HOST, port: listener.port }, expectPeer: { id: 'calibration-worker' }, credentials: head }, { bulkRounds: 0 })).rttSeconds,
    stop() {
      for (const pid of [forwarder.pid, 'pid' in listener ? listener.pid() : undefined]) {
        try {
          if (pid !== undefined) process.kill(pid, 'SIGKILL');
        } catch {}
      }
      void Promise.allSettled([forwarder.close(), listener.close()]);
    },
  };
}
