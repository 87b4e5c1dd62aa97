"""The MLflow pyfunc wrapper of a released chatbot: base model + LoRA adapter, chat template, greedy decoding.

    import mlflow; m = mlflow.pyfunc.load_model("models:/ecommerce-chatbot@champion")
    m.predict({"messages": ['[{"role": "user", "content": "Where is my order?"}]']})
"""

from __future__ import annotations

import json

import mlflow.pyfunc


class ChatbotModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        from tasks.config import load_config
        from tasks.ml import models

        cfg = load_config(None, [f"model.base_model={json.dumps(context.model_config['base_model'])}"])
        self.max_new_tokens = int(context.model_config.get("max_new_tokens", 128))
        self.tokenizer, self.model = models.load_local(cfg, context.artifacts["adapter"])

    def predict(self, context, model_input, params=None):
        from tasks.ml import generation

        rows = model_input["messages"] if isinstance(model_input, dict) else list(model_input["messages"])
        conversations = [json.loads(r) if isinstance(r, str) else r for r in rows]
        prompts = generation.render_prompts(self.tokenizer, conversations)
        return generation.generate_batched(self.model, self.tokenizer, prompts, self.max_new_tokens, batch_size=16)
