#!/usr/bin/env python
"""The minimal Django project the Hato email backend is tested with."""

import os
import sys

if __name__ == "__main__":
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "signup.settings")
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)
