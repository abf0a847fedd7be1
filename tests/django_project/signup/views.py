"""The sign-up view: the mail is enqueued in the request, never sent over SMTP here."""

from django.core.mail import EmailMultiAlternatives
from django.http import HttpRequest, HttpResponse, HttpResponseBadRequest


def signup(request: HttpRequest) -> HttpResponse:
    address = request.POST.get("email", "")
    if request.method != "POST" or not address:
        return HttpResponseBadRequest("email required")
    message = EmailMultiAlternatives(
        subject="Welcome to Sign-up ✓",
        body=f"Hello {address}, confirm with the link.",
        to=[address],
        bcc=["audit@signup.example"],
        headers={"Hato-Idempotency-Key": f"signup:{address}"},
    )
    message.attach_alternative(f"<p>Hello <b>{address}</b></p>", "text/html")
    sent = message.send()
    return HttpResponse(f"sent {sent}")
