// Preloaded by scripts/test.mjs on a node without a WebSocket class: the ws package's, as the global one.
import { WebSocket } from "ws";

globalThis.WebSocket ??= WebSocket;
