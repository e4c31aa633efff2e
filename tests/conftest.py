pytest_plugins = [
    "tests.dovecot_fixtures",
    "tests.proxy_fixtures",
    "tests.redis_fixtures",
    "tests.tls_fixtures",
    "tests.second_upstream",
]
