"""Evaluation: perplexity (paper protocol), zero-shot accuracy via lm-eval, offline local tasks, speed."""
from pgprune.data.local_tasks import write_local_tasks
from pgprune.eval.perplexity import perplexity, text_perplexity
from pgprune.eval.speed import forward_throughput, generation_speed
from pgprune.eval.zeroshot import PAPER_TASKS, zero_shot

__all__ = ["PAPER_TASKS", "forward_throughput", "generation_speed", "perplexity", "text_perplexity", "write_local_tasks",
           "zero_shot"]
