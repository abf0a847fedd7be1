"""``manage.py send_signup_mail ADDRESS``: send_mail and EmailMultiAlternatives through Hato."""

from typing import Any

from django.core.mail import EmailMultiAlternatives, send_mail
from django.core.management.base import BaseCommand, CommandParser


class Command(BaseCommand):
    help = "Send the sign-up mails to ADDRESS through the configured EMAIL_BACKEND."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("address")

    def handle(self, *args: Any, **options: Any) -> None:
        address = options["address"]
        plain = send_mail("Plain hello", "Just text.", None, [address])
        rich = EmailMultiAlternatives(
            subject="Ünïcödé welcome",
            body="Text part: café",
            from_email="Équipe <team@signup.example>",
            to=[f"Ann Example <{address}>"],
            cc=["cc@signup.example"],
            bcc=["secret@signup.example"],
            reply_to=["help@signup.example"],
            headers={"X-Campaign": "spring"},
        )
        rich.attach_alternative("<p>HTML part: café</p>", "text/html")
        rich.attach("report.pdf", b"%PDF-1.4 binary \x00\xff", "application/pdf")
        rich.attach("notes.txt", "plain attachment", "text/plain")
        self.stdout.write(f"sent {plain + rich.send()}")
