/**
 * The Ethernet links the benches shape a simulated LAN to (tc tbf, test/helpers/netns.ts
 * shapeLink): bench:lan's profiles and bench:tunnel's `--link`. One table, so both benches mean
 * the same 1 GbE.
 */
export const LINK_BITS_PER_SECOND = { '1gbe': 1e9, '10gbe': 10e9 } as const;

export type LinkName = keyof typeof LINK_BITS_PER_SECOND;

export function isLinkName(s: string): s is LinkName {
  return Object.hasOwn(LINK_BITS_PER_SECOND, s);
}
