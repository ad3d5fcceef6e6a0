// XADDs the Redis docs' three documents to embed-worker's stream with the npm `redis` client,
// as a Node.js producer would. Usage: node producer.mjs [REDIS_URL] [STREAM]
// (defaults: redis://127.0.0.1:6379 and embed:docs). Prints one entry ID per line.
import { createClient } from "redis";

const url = process.argv[2] ?? "redis://127.0.0.1:6379";
const stream = process.argv[3] ?? "embed:docs";

const docs = [
  { content: "That is a very happy person", genre: "persons" },
  { content: "That is a happy dog", genre: "pets" },
  { content: "Today is a sunny day", genre: "weather" },
];

const client = createClient({ url });
client.on("error", (err) => {
  console.error(`redis: ${err.message}`);
  process.exitCode = 1;
});
await client.connect();
try {
  for (const [i, doc] of docs.entries()) {
    // The message contract: `id` names the hash (<prefix><id>), `content` is embedded, every
    // other field is copied into the hash as given.
    const entryId = await client.xAdd(stream, "*", { id: String(i), ...doc });
    console.log(entryId);
  }
} finally {
  await client.quit();
}
