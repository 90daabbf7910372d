rule launch_jupyter:
    input:
        unpack(get_launch_inputs),
        receipt=rules.build_image.output.receipt,
    output:
        connection=f"{RESULTS}/{{name}}/{{sha}}/launch.json",
    log:
        get_step_log("launch_jupyter"),
    benchmark:
        get_step_benchmark("launch_jupyter")
    # a local server must outlive the rule, and a Slurm launch submits its own job and only
    # waits for it: neither may run inside a job of the Slurm executor
    localrule: True
    params:
        runtime=settings.runtime,
        server_log=f"{RESULTS}/{{name}}/{{sha}}/logs/jupyter-server.log",
        # a Slurm launch unpacks it in the server's job; a local one takes unpack_sandbox's
        sandbox=rules.unpack_sandbox.params.sandbox,
        work_folder=get_work_folder,
        unpack_log=get_step_log("unpack_sandbox"),
        jupyter_command=settings.jupyter_command,
        timeout=settings.launch_timeout,
        writable=settings.launch_writable,
        idle_timeout=config["idle_timeout"],
        # a plain value: a change of where or how the server runs relaunches it
        launcher=LAUNCHER_SETTINGS,
        runtime_args=get_launch_runtime_args,
        binds=config["launch_binds"],
    script:
        f"{SCRIPTS}/launch_jupyter.py"


rule launch:
    input:
        get_targets("{results}/{name}/{sha}/launch.json"),


rule servers:
    log:
        f"{RESULTS}/logs/servers/{CALL_STAMP}.log",
    benchmark:
        f"{RESULTS}/benchmarks/servers/{CALL_STAMP}.tsv"
    localrule: True
    params:
        results=RESULTS,
    script:
        f"{SCRIPTS}/list_servers.py"


rule stop:
    log:
        f"{RESULTS}/logs/stop/{CALL_STAMP}.log",
    benchmark:
        f"{RESULTS}/benchmarks/stop/{CALL_STAMP}.tsv"
    localrule: True
    params:
        names=list(settings.builds),
        results=RESULTS,
    script:
        f"{SCRIPTS}/stop_servers.py"


onsuccess:
    # only where this run resolved refs: `stop` and `--lint` must not touch the network
    if get_resolved_builds.cache_info().currsize:
        for build in get_resolved_builds():
            connection_file = Path(RESULTS, build.name, build.sha, "launch.json")
            if connection_file.exists():
                print(servers.connection_message(connection_file))
        # the last lines: where each image's SIF is (a manifest's summary lists them instead)
        if not settings.from_manifest:
            for build in get_resolved_builds():
                line = results.sif_line(RESULTS, build.name, build.sha)
                if line:
                    print(line)
    if write_run_summary():
        fail("some images of the manifest failed; see results/summary.md")
