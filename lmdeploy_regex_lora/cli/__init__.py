"""The ``lmdeploy-regex-lora`` command (:mod:`.main`): one module per subcommand, loaded only when it runs."""
