"""Compare eval runs in one markdown table per benchmark (+ cost), and a self-contained HTML page with
sample trajectories and failures.

  bagel-ft report runs/eval/geneval-base runs/eval/geneval-ft-single runs/eval/geneval-ft-psir --out runs/report
  bagel-ft report runs/eval/shapes-*                        # writes report.md + report.html into ./report

Each RUN is a directory written by `bagel-ft eval`; columns are labelled by its --label (else
`<ckpt name>/<mode>`). Runs of different benchmarks get separate sections.
"""

from __future__ import annotations


def add_arguments(parser) -> None:
    parser.add_argument("runs", nargs="+", metavar="RUN", help="eval run directories")
    parser.add_argument("--out", default="report", help="directory for report.md and report.html")
    parser.add_argument("--print", action="store_true", help="also print the markdown")


def run(args) -> int:
    from eval.report import write_report

    md, page = write_report(args.runs, args.out)
    if args.print:
        print(md.read_text())
    print(f"wrote {md} and {page}")
    return 0
