rule describe_image:
    input:
        receipt=rules.build_image.output.receipt,
        sif=rules.build_sif.output.sif,
    output:
        card=report(
            f"{RESULTS}/{{name}}/{{sha}}/{{name}}.card.html",
            category="Images",
            labels={"name": "{name}", "commit": "{sha}"},
        ),
    log:
        get_step_log("describe_image"),
    benchmark:
        get_step_benchmark("describe_image")
    localrule: True
    params:
        benchmarks=lambda wildcards: [
            f"{RESULTS}/{wildcards.name}/{wildcards.sha}/benchmarks/{step}.tsv"
            for step in ("clone_source", "build_image", "save_image", "build_sif")
        ],
    script:
        f"{SCRIPTS}/describe_image.py"


rule prune:
    log:
        f"{RESULTS}/logs/prune/{CALL_STAMP}.log",
    benchmark:
        f"{RESULTS}/benchmarks/prune/{CALL_STAMP}.tsv"
    localrule: True
    params:
        results=RESULTS,
        keep=settings.keep_sifs,
        names=list(settings.builds),
        # a function: a string's "{name}" would be taken for a wildcard
        work_dir=lambda wildcards: config["work_dir"],
    script:
        f"{SCRIPTS}/prune.py"


onerror:
    write_run_summary()
