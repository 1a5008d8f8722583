"""Next-token perplexity and top-1 accuracy of a causal LM, as an `evaluate` module that loads offline.

    metric = evaluate.load("<path>/ds_spd/metrics/next_token")
    metric.add_batch(predictions=argmax_ids, references=target_ids, target_logprobs=logprobs_of_targets)
    metric.compute()  # {"perplexity": ..., "accuracy": ..., "tokens": ...}
"""
import datasets
import evaluate
import numpy as np

_DESCRIPTION = "Perplexity (exp of the mean negative log-likelihood) and top-1 accuracy of next-token predictions."
_INPUTS = """
predictions: predicted (argmax) token ids; references: the actual next tokens;
target_logprobs: the model's log-probability of each actual next token.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _INPUTS)
class NextToken(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION, citation="", inputs_description=_INPUTS,
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64"),
                                        "target_logprobs": datasets.Value("float64")}))

    def _compute(self, predictions, references, target_logprobs):
        predictions, references = np.asarray(predictions), np.asarray(references)
        logprobs = np.asarray(target_logprobs, dtype=np.float64)
        return {"perplexity": float(np.exp(-logprobs.mean())), "accuracy": float((predictions == references).mean()),
                "tokens": int(references.size)}
