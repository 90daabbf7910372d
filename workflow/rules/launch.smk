rule launch_jupyter:
    input:
        sandbox=rules.unpack_sandbox.output.sandbox,
        receipt=rules.build_image.output.receipt,
    output:
        connection=f"{RESULTS}/{{name}}/{{sha}}/launch.json",
    log:
        get_step_log("launch_jupyter"),
    benchmark:
        get_step_benchmark("launch_jupyter")
    params:
        runtime=settings.runtime,
        server_log=f"{RESULTS}/{{name}}/{{sha}}/logs/jupyter-server.log",
        jupyter_command=settings.jupyter_command,
        timeout=settings.launch_timeout,
        writable=settings.launch_writable,
    script:
        f"{SCRIPTS}/jupyter.py"


rule launch:
    input:
        get_targets("{results}/{name}/{sha}/launch.json"),


rule stop:
    log:
        f"{RESULTS}/logs/stop.log",
    localrule: True
    params:
        names=list(settings.builds),
        results=RESULTS,
    script:
        f"{SCRIPTS}/jupyter.py"


onsuccess:
    # only where this run resolved refs: `stop` and `--lint` must not touch the network
    if get_resolved_builds.cache_info().currsize:
        import jupyter

        for build in get_resolved_builds():
            connection_file = Path(RESULTS, build.name, build.sha, "launch.json")
            if connection_file.exists():
                print(jupyter.connection_message(connection_file))
    if write_run_summary():
        fail("some images of the manifest failed; see results/summary.md")
