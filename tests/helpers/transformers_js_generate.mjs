// Greedy generation with transformers.js on an exported FastVLM folder, offline:
//   node helpers/transformers_js_generate.mjs MODEL_FOLDER IMAGE TEXT MAX_NEW_TOKENS DTYPE
// prints {"input_ids": [...], "new_tokens": [...]} as one JSON line. Resolves @huggingface/transformers from
// NODE_PATH (the folder it was installed into).
import { createRequire } from "node:module";
import path from "node:path";

const require = createRequire(path.join(process.env.NODE_PATH ?? process.cwd(), "noop.js"));
const { AutoProcessor, AutoModelForImageTextToText, RawImage, env } = await import(
  require.resolve("@huggingface/transformers")
);

const [folder, imagePath, text, maxNewTokens, dtype] = process.argv.slice(2);
env.allowRemoteModels = false;
env.allowLocalModels = true;
env.localModelPath = path.dirname(path.resolve(folder));
const name = path.basename(path.resolve(folder));

const processor = await AutoProcessor.from_pretrained(name);
const model = await AutoModelForImageTextToText.from_pretrained(name, { dtype, device: "cpu" });
const messages = [{ role: "user", content: [{ type: "image" }, { type: "text", text }] }];
const prompt = processor.apply_chat_template(messages, { add_generation_prompt: true });
const inputs = await processor(await RawImage.read(imagePath), prompt);
const output = await model.generate({ ...inputs, max_new_tokens: Number(maxNewTokens), do_sample: false });
const promptLength = inputs.input_ids.dims[1];
console.log(JSON.stringify({
  input_ids: Array.from(inputs.input_ids.data, Number),
  new_tokens: Array.from(output.data, Number).slice(promptLength),
}));
