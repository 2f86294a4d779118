/**
 * Engine infos from proto-loader objects (longs as strings, enums as names, camelCase) to
 * Orchard's TypeScript types, at the edge, so nothing deeper sees strings for sizes. Profiles and
 * live stats are converted by src/shared/hardware-wire.ts (the agent sends what we read).
 */
import { num, str, type Wire } from '../../shared/hardware-wire.ts';

export type EngineKindName = 'ENGINE_KIND_RPC_SERVER' | 'ENGINE_KIND_LLAMA_SERVER' | 'ENGINE_KIND_MLX_RANK' | 'ENGINE_KIND_UNSPECIFIED';

export interface EngineInfo {
  readonly engineId: string;
  readonly kind: EngineKindName;
  readonly host: string;
  readonly port: number;
  readonly pid: number;
  readonly model: string;
  readonly startedAtSeconds: number;
  /** The exact command line the agent ran (binary first). */
  readonly argv: readonly string[];
  /** An rpc-server's Unix-domain socket on its node (where it listens; `port` is then its identity only); '' = none. */
  readonly socket: string;
}

/** Where an engine listens on its node: its Unix socket (`unix:<path>`, llama.cpp's endpoint syntax) or host:port. */
export function engineEndpoint(e: EngineInfo): string {
  return e.socket ? `unix:${e.socket}` : `${e.host || '127.0.0.1'}:${e.port}`;
}

export function engineFromWire(e: Wire | undefined | null): EngineInfo {
  const w = e ?? {};
  return {
    engineId: str(w.engineId),
    kind: (str(w.kind) || 'ENGINE_KIND_UNSPECIFIED') as EngineKindName,
    host: str(w.host),
    port: num(w.port),
    pid: num(w.pid),
    model: str(w.model),
    startedAtSeconds: num(w.startedAtSeconds),
    argv: Array.isArray(w.argv) ? w.argv.map(String) : [],
    socket: str(w.socket),
  };
}
