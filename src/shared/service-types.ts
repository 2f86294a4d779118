/**
 * Bonjour service types. Nodes advertise `_orchard._tcp` (the coordinator browses it and dials
 * each agent with mutual TLS); the coordinator advertises `_orchard-coord._tcp` with its cluster
 * CA's fingerprint in TXT `ca`, so a node started with a join token finds the coordinator of
 * *its* cluster (the token carries the same fingerprint) and pins that CA before sending
 * anything (src/shared/pki/pin.ts).
 */
export const COORDINATOR_SERVICE_TYPE = 'orchard-coord';
