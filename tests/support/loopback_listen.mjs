// Preloaded with `node --import` in front of third-party servers (server-everything)
// that listen on all interfaces at a fixed PORT. It pins every TCP listen() to
// 127.0.0.1 and prints one readiness line with the port the kernel chose, so the
// test harness can pass PORT=0 and never race another process for a port.
//
//   READY_TAG=EVERYTHING_READY PORT=0 node --import ./loopback_listen.mjs server.js
//   -> EVERYTHING_READY {"host":"127.0.0.1","port":41234}
import net from "node:net";

const tag = process.env.READY_TAG || "LOOPBACK_READY";
const originalListen = net.Server.prototype.listen;

net.Server.prototype.listen = function patchedListen(...args) {
  const first = args[0];
  if (typeof first === "number" || (typeof first === "string" && /^\d+$/.test(first))) {
    // listen(port[, host][, backlog][, cb]): force the host argument.
    const port = Number(first);
    const rest = args.slice(1);
    if (typeof rest[0] === "string") rest.shift();
    args = [port, "127.0.0.1", ...rest];
  } else if (first && typeof first === "object" && !Array.isArray(first) && "port" in first) {
    args = [{ ...first, host: "127.0.0.1" }, ...args.slice(1)];
  }
  this.once("listening", () => {
    const address = this.address();
    if (address && typeof address === "object") {
      process.stdout.write(`${tag} ${JSON.stringify({ host: address.address, port: address.port })}\n`);
    }
  });
  return originalListen.apply(this, args);
};
