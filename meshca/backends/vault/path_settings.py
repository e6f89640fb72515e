"""The Vault settings that name files: relative paths in a config file are taken from its
folder. Apart from :mod:`meshca.backends.vault.settings` because the option table needs
these names on every command line, and the settings module costs start-up."""

PATH_SETTINGS = frozenset(
    {
        "token_file",
        "secret_id_file",
        "k8s_jwt_file",
        "client_cert",
        "client_key",
        "ca_cert",
    }
)
