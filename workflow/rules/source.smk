rule clone_source:
    output:
        source=directory(f"{RESULTS}/{{name}}/{{sha}}/source"),
    log:
        get_step_log("clone_source"),
    benchmark:
        get_step_benchmark("clone_source")
    localrule: True
    params:
        # an object, not the URL: Snakemake records plain params in .snakemake/metadata, and
        # a URL may hold credentials
        repository=lambda wildcards: get_build(wildcards).repository,
        # a builder that fetches the commit itself leaves source/ empty: switching to one that
        # does not must clone again (a changed param reruns the rule)
        fetched_by=lambda wildcards: BUILDER.kind if BUILDER.fetches_source else "",
    script:
        f"{SCRIPTS}/clone_source.py"
