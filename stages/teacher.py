"""Stage `teacher`: the dense base model's top-k next-token log-probabilities (recover.teacher_topk) of the
recovery's training blocks (the calibration blocks re-cut to recover.seq_len), computed once and shared by every
`recover@...` cell (:mod:`pgprune.recovery.teacher`). With recover.teacher_topk 0 or recover.loss lm it writes only
teacher.json saying so, and the recovery cells distil from the live teacher (or do not distil)."""
from pgprune.data.prepare import load_calibration
from pgprune.hf.loading import load_configured
from pgprune.io import atomic_dir, write_json
from pgprune.data.blocks import recut_blocks
from pgprune.recovery.teacher import teacher_topk
from stages._common import parse, run


def main(argv=None):
    def args(ap):
        ap.add_argument("--model", required=True, help="the base model (the distillation teacher)")
        ap.add_argument("--data", required=True, help="prepared data (calibration blocks)")
        ap.add_argument("--out", required=True, help="teacher cache folder")

    params, a = parse(__doc__, args, argv)
    r = params.recover
    k = r.teacher_topk if r.loss == "kd" else 0
    with atomic_dir(a.out) as out:
        info = {"teacher_topk": k, "temperature": r.temperature, "teacher": params.model.source}
        if k:
            model, _ = load_configured(a.model, params.model)
            for p in model.parameters():
                p.requires_grad_(False)
            blocks = recut_blocks(load_calibration(a.data), r.seq_len, r.max_blocks)
            cache = teacher_topk(model.eval(), blocks, k, r.temperature, teacher_id=params.model.source,
                                 batch_size=r.batch_size)
            cache.save(out)
            info |= {"blocks": int(blocks.shape[0]), "seq_len": int(blocks.shape[1])}
        write_json(out / "teacher.json", info)
    print(f"teacher: top-{k} of {info.get('blocks', 0)} blocks" if k else "teacher: no cache (live teacher)")


if __name__ == "__main__":
    run(main)
