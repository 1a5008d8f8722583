"""Next-token perplexity and top-1 accuracy of a causal LM, as an `evaluate` module that loads offline.

    metric = evaluate.load("<path>/ds_spd/metrics/next_token")
    metric.add_batch(predictions=argmax_ids, references=target_ids, target_logprobs=logprobs_of_targets)
    metric.compute()  # {"perplexity": ..., "accuracy": ..., "tokens": ...}
    metric.compute(tokens_per_segment=T)  # also 95% bootstrap intervals over segments of T scored tokens
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

    def _compute(self, predictions, references, target_logprobs, tokens_per_segment=None, resamples=1000, seed=0):
        predictions, references = np.asarray(predictions), np.asarray(references)
        logprobs = np.asarray(target_logprobs, dtype=np.float64)
        result = {"perplexity": float(np.exp(-logprobs.mean())),
                  "accuracy": float((predictions == references).mean()), "tokens": int(references.size)}
        if tokens_per_segment and references.size % tokens_per_segment == 0 and references.size > tokens_per_segment:
            # 95% percentile bootstrap over segments (tokens within a segment are not independent)
            nll = -logprobs.reshape(-1, tokens_per_segment).sum(1)
            hits = (predictions == references).reshape(-1, tokens_per_segment).sum(1)
            idx = np.random.default_rng(seed).integers(0, nll.size, size=(resamples, nll.size))
            n = tokens_per_segment * nll.size
            ppl = np.exp(nll[idx].sum(1) / n)
            acc = hits[idx].sum(1) / n
            result.update({"segment_nll": [float(v) for v in nll], "segment_hits": [int(v) for v in hits],
                           "perplexity_ci95": [float(v) for v in np.percentile(ppl, [2.5, 97.5])],
                           "accuracy_ci95": [float(v) for v in np.percentile(acc, [2.5, 97.5])],
                           "ci": f"95% percentile bootstrap over {nll.size} segments, {resamples} resamples"})
        return result
