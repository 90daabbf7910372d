rule prune:
    log:
        f"{RESULTS}/logs/prune.log",
    localrule: True
    params:
        results=RESULTS,
        keep=settings.keep_sifs,
        names=list(settings.builds),
    script:
        f"{SCRIPTS}/retention.py"


onerror:
    write_run_summary()
