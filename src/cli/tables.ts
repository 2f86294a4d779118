import Table from 'cli-table3';
import { z } from 'zod';
import { formatBandwidth, formatBytes } from '../shared/units.ts';

/**
 * Tables the CLI prints (plan, placement). Pure: data in, text out, so layout is unit-tested.
 * Human units everywhere (MiB/GiB, GB/s, tok/s); numbers right-aligned.
 */

const bytesSchema = z.object({ weights: z.number(), kv: z.number(), compute: z.number(), overhead: z.number(), total: z.number() });

/** The planner's result as `orchard plan --json` and the coordinator's Plan RPC return it. */
export const planJsonSchema = z
  .object({
    fits: z.boolean(),
    stages: z.array(
      z
        .object({
          node: z.string(),
          role: z.string(),
          firstLayer: z.number(),
          lastLayer: z.number(),
          bytes: bytesSchema,
          budgetBytes: z.number(),
          headroomBytes: z.number(),
          bandwidthBytesPerSecond: z.number(),
        })
        .loose(),
    ),
    predicted: z.object({ tokensPerSecond: z.number() }).loose(),
    reasons: z.array(z.string()).default([]),
  })
  .loose();
export type PlanJson = z.infer<typeof planJsonSchema>;

const right = (n: number) => Array.from({ length: n }, () => 'right' as const);

export function layerRange(first: number, last: number): string {
  return last >= first ? `${first}–${last}` : '—';
}

/** What the plan table reads: a planner Plan or its JSON (readonly, so both fit). */
export interface PlanTableInput {
  readonly stages: readonly {
    readonly node: string;
    readonly role: string;
    readonly firstLayer: number;
    readonly lastLayer: number;
    readonly bytes: z.infer<typeof bytesSchema>;
    readonly budgetBytes: number;
    readonly headroomBytes: number;
    readonly bandwidthBytesPerSecond: number;
  }[];
  readonly predicted: { readonly tokensPerSecond: number };
}

export function renderPlanTable(plan: PlanTableInput): string {
  const t = new Table({
    head: ['stage', 'node', 'role', 'layers', 'weights', 'KV', 'compute', 'overhead', 'total', 'budget', 'headroom', 'bandwidth'],
    colAligns: ['right', 'left', 'left', 'right', ...right(8)],
    style: { head: [], border: [] },
  });
  plan.stages.forEach((s, i) => {
    t.push([
      String(i),
      s.node,
      s.role,
      layerRange(s.firstLayer, s.lastLayer),
      formatBytes(s.bytes.weights),
      formatBytes(s.bytes.kv),
      formatBytes(s.bytes.compute),
      formatBytes(s.bytes.overhead),
      formatBytes(s.bytes.total),
      formatBytes(s.budgetBytes),
      formatBytes(s.headroomBytes),
      formatBandwidth(s.bandwidthBytesPerSecond),
    ]);
  });
  return `${t.toString()}\npredicted: ${plan.predicted.tokensPerSecond.toFixed(1)} tok/s\n`;
}

/** `orchard` extension of a /v1/models entry: where the loaded model's bytes went. */
export const placementJsonSchema = z
  .object({
    stages: z.array(
      z
        .object({
          stage: z.number(),
          role: z.string(),
          node: z.string(),
          first_layer: z.number(),
          last_layer: z.number(),
          endpoint: z.string().nullable(),
          bytes: bytesSchema,
        })
        .loose(),
    ),
    verification: z
      .object({
        ok: z.boolean(),
        devices: z.array(
          z
            .object({
              device: z.string(),
              node: z.string(),
              actual_layers: z.string(),
              actual_bytes: z.object({ model: z.number(), kv: z.number(), compute: z.number() }),
            })
            .loose(),
        ),
      })
      .loose()
      .nullable()
      .default(null),
  })
  .loose();
export type PlacementJson = z.infer<typeof placementJsonSchema>;

/** Planned bytes per stage next to what llama.cpp reported for the stage's device. */
export function renderPlacementTable(p: PlacementJson): string {
  const t = new Table({
    head: ['stage', 'node', 'layers', 'engine device', 'planned weights', 'reported weights', 'planned KV', 'reported KV', 'reported compute'],
    colAligns: ['right', 'left', 'right', 'left', ...right(5)],
    style: { head: [], border: [] },
  });
  p.stages.forEach((s) => {
    const d = p.verification?.devices.find((x) => x.node === s.node);
    t.push([
      String(s.stage),
      s.node,
      layerRange(s.first_layer, s.last_layer),
      d?.device ?? '—',
      formatBytes(s.bytes.weights),
      d ? formatBytes(d.actual_bytes.model) : '—',
      formatBytes(s.bytes.kv),
      d ? formatBytes(d.actual_bytes.kv) : '—',
      d ? formatBytes(d.actual_bytes.compute) : '—',
    ]);
  });
  return `${t.toString()}\n`;
}
