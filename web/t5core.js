// T5 (fast) nodes: a token count under the Encode Prompt text (approximate while typing, exact after a run),
// and the precision line (dtype, attention, fused norms, float16 scales, tokenizer) on the encoder nodes.
import { app } from "../../scripts/app.js";

const ENCODER_NODES = new Set(["T5CoreLoadEncoder", "T5CoreFuseNorms", "T5CoreFP16Scale"]);
const ENCODE_NODE = "T5CoreEncodePrompt";
// Per family: ComfyUI's minimum T5 length, and the longest prompt the model was trained with. Longer prompts
// are not cut (as in ComfyUI), but the model may ignore their end, so the count turns orange.
const FAMILIES = { "Flux": [256, 512], "SD3": [77, 256], "Chroma": [1, 512], "PixArt": [1, 300], "LTXV": [128, 128],
  "Mochi": [256, 256], "Cosmos": [512, 512], "WAN": [512, 512], "HiDream": [128, 128], "plain T5": [0, 512] };
const LINE_HEIGHT = 15;

// T5's sentencepiece gives about one token per common word or punctuation mark, more for long or rare words.
function approxTokens(text) {
  const plain = text
    .replace(/\\[()]/g, " ")
    .replace(/:\s*[-+]?[\d.]+\s*\)/g, ")") // "(word:1.2)": the weight is not tokenized
    .replace(/[()]/g, " ");
  let count = 1; // EOS
  for (const part of plain.match(/[\p{L}\p{N}]+|[^\s\p{L}\p{N}]/gu) || []) {
    count += /[\p{L}\p{N}]/u.test(part) ? Math.max(1, Math.ceil(part.length / 7)) : 1;
  }
  return count;
}

// A drawn, never-serialized line of text below the node's widgets; wraps at " · ".
function addInfo(node) {
  const info = {
    name: "t5core_info",
    type: "t5core_info",
    value: "",
    warn: false,
    lines: 1,
    serialize: false,
    options: { serialize: false },
    draw(ctx, _node, width, y) {
      if (!this.value) return;
      ctx.save();
      ctx.font = "11px sans-serif";
      ctx.fillStyle = this.warn ? "#f0a030" : "#9a9a9a";
      const lines = [];
      for (const part of this.value.split(" · ")) {
        const last = lines.length - 1;
        if (last >= 0 && ctx.measureText(lines[last] + " · " + part).width < width - 30) lines[last] += " · " + part;
        else lines.push(part);
      }
      lines.forEach((line, i) => ctx.fillText(line, 15, y + 12 + i * LINE_HEIGHT));
      ctx.restore();
      if (lines.length !== this.lines) {
        this.lines = lines.length;
        requestAnimationFrame(() => node.setSize([node.size[0], node.computeSize()[1]]));
      }
    },
    computeSize(width) {
      return [width, this.lines * LINE_HEIGHT + 4];
    },
  };
  node.addCustomWidget(info);
  return info;
}

function show(node, info, text) {
  info.value = text || "";
  info.warn = info.value.includes("⚠");
  node.setDirtyCanvas(true, true);
}

function chain(object, method, after) {
  const before = object[method];
  object[method] = function () {
    const result = before?.apply(this, arguments);
    after.apply(this, arguments);
    return result;
  };
}

function setUpEncode(node) {
  const info = addInfo(node);
  const text = node.widgets?.find((w) => w.name === "text");
  const family = node.widgets?.find((w) => w.name === "family");
  const estimate = () => {
    const [minLength, trained] = FAMILIES[family?.value] || FAMILIES["Flux"];
    const n = approxTokens(String(text?.value ?? ""));
    let line = `≈${n} tokens` + (minLength > n ? `, padded to ${minLength}` : "");
    const cut = family?.value === "HiDream" ? "ComfyUI cuts the rest" : "nothing is cut"; // HiDream's T5: 128 at most
    if (n > trained) line += ` ⚠ more than the ${trained} ${family?.value} was trained with (${cut})`;
    show(node, info, line);
  };
  const input = text?.inputEl || text?.element; // the textarea, in old and new frontends
  input?.addEventListener?.("input", estimate);
  for (const widget of [text, family]) if (widget) chain(widget, "callback", estimate);
  chain(node, "onConfigure", estimate);
  estimate();
  return info;
}

app.registerExtension({
  name: "t5core.nodes",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    const isEncode = nodeData.name === ENCODE_NODE;
    if (!isEncode && !ENCODER_NODES.has(nodeData.name)) return;
    chain(nodeType.prototype, "onNodeCreated", function () {
      this.t5coreInfo = isEncode ? setUpEncode(this) : addInfo(this);
    });
    // The nodes return {"ui": {"text": [line]}}: the exact token count, or the encoder's precision.
    chain(nodeType.prototype, "onExecuted", function (message) {
      if (this.t5coreInfo && message?.text) show(this, this.t5coreInfo, message.text[0]);
    });
  },
});
