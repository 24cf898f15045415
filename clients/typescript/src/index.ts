// dpslm-stream-client: the TypeScript client of the dpslm-stream live units server.
export * from "./protocol.js";
export * from "./wire.js";
export * from "./client.js";
export * from "./capture.js";
