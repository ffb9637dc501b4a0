"""Stage `data`: calibration blocks, held-out evaluation texts and offline zero-shot tasks."""
from transformers import AutoTokenizer

from pgprune.data.prepare import prepare_data
from stages._common import parse, run


def main(argv=None):
    def args(ap):
        ap.add_argument("--tokenizer", required=True)
        ap.add_argument("--out", required=True)

    params, a = parse(__doc__, args, argv)
    stats = prepare_data(params, AutoTokenizer.from_pretrained(a.tokenizer), a.out)
    print(stats)


if __name__ == "__main__":
    run(main)
