"""Authentication and authorization servers (AS, AZ) and the user database they use.

``migsec.auth.users.UserDatabase`` holds the AS's users: roles, scrypt password
verifiers (SK1) and OpenSSH public keys for ssh-agent login.
"""
