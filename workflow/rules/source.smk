rule clone_source:
    output:
        source=directory(f"{RESULTS}/{{name}}/{{sha}}/source"),
    log:
        get_step_log("clone_source"),
    benchmark:
        get_step_benchmark("clone_source")
    localrule: True
    params:
        url=lambda wildcards: get_build(wildcards).repository.url,
    script:
        f"{SCRIPTS}/clone_source.py"
