"""Stage `eval`: perplexity, zero-shot and generation speed of the dense and the saved pruned model."""
from pgprune.io import read_json, write_json
from pgprune.models import load_model
from pgprune.slicing import load_pruned
from pgprune.models import torch_dtype
from pgprune.workflow import evaluate, load_data
from stages._common import BASE_DIR, DATA_DIR, parse, run


def main(argv=None):
    params, _ = parse(__doc__, argv=argv)
    dense, tok = load_model(BASE_DIR, params.model.dtype, params.model.device)
    _, evals, tasks = load_data(DATA_DIR, tok, params)
    result = {"sparsity": params.search.sparsity, "dense": evaluate(dense, tok, evals, tasks, params)}
    del dense
    pruned = load_pruned("models/pruned", dtype=torch_dtype(params.model.dtype), device=params.model.device)
    result["pruned"] = evaluate(pruned, tok, evals, tasks, params)
    result["pruned"]["params"] = read_json("artifacts/slice/summary.json")
    d, p = result["dense"], result["pruned"]
    if d.get("tokens_per_s") and p.get("tokens_per_s"):
        result["speedup"] = p["tokens_per_s"] / d["tokens_per_s"]
    write_json("artifacts/eval/metrics.json", result)
    print(result)


if __name__ == "__main__":
    run(main)
