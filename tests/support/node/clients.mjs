// The JS clients through a swap: prints what each showed, as one JSON object.
// Usage: node clients.mjs BASE_URL CLIENT MODEL  (CLIENT: openai | openai-overflow |
// ollama | ollama-overflow). The Python test (tests/test_node_clients.py) judges it.
import { Ollama } from "ollama";
import OpenAI from "openai";

const [url, client, model] = process.argv.slice(2);
const LONG = Array(5000).fill("word").join(" ");
const hello = [{ role: "user", content: "hi" }];

async function openai(messages) {
  const sdk = new OpenAI({ baseURL: url + "/v1", apiKey: "unused", maxRetries: 0 });
  const seen = { reasoning: "", content: "", ids: [] };
  const stream = await sdk.chat.completions.create({ model, messages, stream: true });
  for await (const chunk of stream) {
    if (!seen.ids.includes(chunk.id)) seen.ids.push(chunk.id);
    const delta = chunk.choices[0]?.delta ?? {};
    seen.reasoning += delta.reasoning_content ?? "";
    seen.content += delta.content ?? "";
  }
  return seen;
}

async function ollama(messages, think = true) {
  const api = new Ollama({ host: url });
  const seen = { thinking: "", content: "" };
  for await (const part of await api.chat({ model, messages, stream: true, think })) {
    seen.thinking += part.message.thinking ?? "";
    seen.content += part.message.content ?? "";
  }
  return seen;
}

async function caught(run) {
  try {
    await run();
    return { error: null };
  } catch (error) {
    return { error: error.constructor.name, status: error.status ?? error.status_code ?? null,
             type: error.type ?? error.error?.type ?? null, message: String(error.message) };
  }
}

const runs = {
  openai: () => openai(hello),
  "openai-overflow": () => caught(() => openai([{ role: "user", content: LONG }])),
  ollama: () => ollama(hello),
  // Without think: no early 200, so the error is a status (in-band it is a plain Error).
  "ollama-overflow": () => caught(() => ollama([{ role: "user", content: LONG }], false)),
};
console.log(JSON.stringify(await runs[client]()));
