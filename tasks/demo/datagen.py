"""Seeded generator of a Bitext-schema e-commerce customer-support dataset (synthetic, our own templates).

The CSV has the columns of the public Bitext customer-support dataset, ``flags,instruction,category,intent,response``,
so the demo pipeline reads it with the same code path as the real data. Placeholders such as ``{{Order Number}}`` stay
literally in the text, as Bitext does. The ``flags`` column lists the Bitext variation letters actually applied:

    B basic syntax (always)      I interrogative (ends with '?')   K keyword style (short)
    L lexical (synonyms)         E expanded contractions           P politeness
    Q colloquial ("wanna", "u")  Z noise (seeded typos, placeholders untouched)

Run it from the repository root:

    python -m tasks.demo.datagen --rows 2400 --seed 0 --out demo.csv

or as a platform step (writes ``demo_support_conversations.csv`` under ``dest``):

    python -m tasks generate_demo_data --input dest=s3://bucket/demo/ --input rows=2400 --input seed=0
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import random
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

FIELDNAMES = ("flags", "instruction", "category", "intent", "response")
FILE_NAME = "demo_support_conversations.csv"
FLAG_LETTERS = frozenset("BEIKLPQZ")
_MAX_TRIES = 4

PLACEHOLDERS = frozenset({
    "Order Number", "Account Type", "Account Category", "Refund Amount", "Currency Symbol",
    "Customer Support Phone Number", "Customer Support Hours", "Customer Support Email", "Website URL",
    "Invoice Number", "Delivery City", "Delivery Country", "Online Order Interaction", "Online Company Portal Info",
    "Person Name", "Date Range", "Login Page URL", "Store Location", "Settings",
})

# Words that mark a variation; noise never touches them so the flag stays visible.
POLITE_MARKERS = frozenset({"please", "pls", "plz", "thank", "thanks", "thx", "kindly", "appreciate"})
COLLOQUIAL_MARKERS = frozenset({"wanna", "gonna", "gotta", "lemme", "pls", "thx", "u", "ur", "ya", "yo", "hey", "im",
                                "dont", "cant"})


@dataclass(frozen=True)
class Intent:
    category: str
    templates: tuple[str, ...]  # statements; "[a|b]" picks one alternative
    actions: tuple[str, ...]  # infinitive verb phrases, used for questions and generic frames
    keywords: tuple[str, ...]  # short keyword-style requests
    openers: tuple[str, ...]  # first sentence(s) of a response
    bodies: tuple[str, ...]  # middle of a response (some with numbered steps)


def _i(category, templates, actions, keywords, openers, bodies) -> Intent:
    return Intent(category, tuple(templates), tuple(actions), tuple(keywords), tuple(openers), tuple(bodies))


_SPECS: dict[str, Intent] = {
    "cancel_order": _i(
        "ORDER",
        ["[I need|I want|I'd like] to cancel [my order|order|the order] {{Order Number}}",
         "I [don't|do not] want the [items|stuff] from order {{Order Number}} anymore, cancel it",
         "I've changed my mind about order {{Order Number}} and [need|want] to cancel it",
         "[help me|I need help to] cancel [the purchase|my purchase|order] {{Order Number}}",
         "I'm trying to cancel order {{Order Number}} [but I can't find the option|before it ships|on the website]",
         "cancellation of order {{Order Number}} [right now|today|as soon as possible]",
         "I [ordered|bought] something by mistake, I [need|want] to cancel order {{Order Number}}"],
        ["cancel order {{Order Number}}", "cancel my [last|recent] purchase", "call off the order {{Order Number}}",
         "cancel [an|my] order"],
        ["cancel order {{Order Number}}", "order cancellation", "cancel purchase {{Order Number}}", "cancel my order"],
        ["I understand you want to cancel order {{Order Number}}, and I'm glad to help.",
         "Thanks for letting us know that you no longer need order {{Order Number}}.",
         "I'm sorry the purchase {{Order Number}} didn't work out for you. Let's get it cancelled."],
        [("Here is how to cancel it:\n\n1. Sign in to your account on {{Website URL}}.\n"
          "2. Open the '{{Online Order Interaction}}' section and select order {{Order Number}}.\n"
          "3. Choose 'Cancel order' and confirm your choice."),
         ("If the order has not shipped yet, the cancellation is processed right away and you will get a confirmation "
          "email. If it has already left our warehouse, you can refuse the delivery or return it for a full refund.")],
    ),
    "change_order": _i(
        "ORDER",
        ["I [need|want] to change [my order|order|the order] {{Order Number}}",
         "I'd like to add [an item|another item|something] to order {{Order Number}}",
         "I [made a mistake|picked the wrong size] in order {{Order Number}} and [need|want] to fix it",
         "[help me|I need help to] edit the items in [my order|order {{Order Number}}]",
         "I want to remove [an item|a product|one article] from [my purchase|order {{Order Number}}]",
         "I'm trying to modify order {{Order Number}} [but I can't find how|before it ships|on the website]",
         "I [have|need] to swap [one item|a product] in order {{Order Number}} for a different one"],
        ["change order {{Order Number}}", "edit [my|an] order", "add an item to order {{Order Number}}",
         "remove a product from [my|an] order"],
        ["change order {{Order Number}}", "modify order", "edit purchase {{Order Number}}", "order changes"],
        ["I see you'd like to make changes to order {{Order Number}}. I can walk you through it.",
         "Of course, changing an order is possible as long as it has not shipped yet.",
         "I understand that order {{Order Number}} needs some adjustments, and I'm happy to help."],
        [("To update it:\n\n1. Log in to {{Website URL}} and go to '{{Online Order Interaction}}'.\n"
          "2. Select order {{Order Number}} and click 'Edit order'.\n3. Add, remove or swap the items you want.\n"
          "4. Review the new total and confirm the changes."),
         ("Changes can be made while the order status is 'Processing'. Once the package is on its way, the easiest "
          "option is to return the items you no longer need and place a new order.")],
    ),
    "place_order": _i(
        "ORDER",
        ["I [want|need|would like] to [buy|purchase] [a few items|some products|a gift] from your store",
         "I'd like to place [an order|a new order] for [two items|several articles|a few products]",
         "[help me|I need help to] place an order [on the website|with my {{Account Type}} account]",
         "I'm trying to [buy|order] something but I can't [finish|complete] the checkout",
         "I've never ordered from you before and [want|need] to [make|place] my first purchase",
         "I want to order [a product|the item] I saw on {{Website URL}}",
         "I [need|want] to make a purchase [today|this week|as soon as possible]"],
        ["place an order", "buy [some|a few] products", "make a purchase", "order an item [online|from the website]"],
        ["place order", "buy item", "new purchase", "order products"],
        ["Thank you for choosing to shop with us! I'm happy to help you place your order.",
         "Great to hear that you'd like to make a purchase.",
         "I'd be glad to guide you through placing an order."],
        [("Just follow these steps:\n\n1. Visit {{Website URL}} and add the products you want to your cart.\n"
          "2. Open the cart and click 'Checkout'.\n3. Enter your shipping address and choose a payment method.\n"
          "4. Review the summary and press 'Place order'."),
         ("You can order as a guest or with your {{Account Type}} account, which lets you track your purchases later. "
          "Once the order is placed, you will receive a confirmation email with your order number.")],
    ),
    "track_order": _i(
        "ORDER",
        ["I [want|need] to know where my order {{Order Number}} is",
         "I'd like to track [my order|order|the package] {{Order Number}}",
         "[my order|order {{Order Number}}|my package] [hasn't arrived yet|is late|still hasn't shipped]",
         "I'm waiting for order {{Order Number}} and I [don't know|can't see] its status",
         "[help me|I need help to] check the status of order {{Order Number}}",
         "I [haven't|have not] received any tracking information for order {{Order Number}}",
         "I placed order {{Order Number}} [last week|a few days ago|on Monday] and [want|need] an update"],
        ["track order {{Order Number}}", "check the status of [my|an] order", "see where my package is",
         "find my order {{Order Number}}"],
        ["track order {{Order Number}}", "order status", "where is my order", "tracking {{Order Number}}"],
        ["I understand you'd like to know where order {{Order Number}} is right now.",
         "Let me help you follow the journey of order {{Order Number}}.",
         "I'm sorry for the wait, and I can show you how to check your order status."],
        [("You can check it in a few steps:\n\n1. Sign in on {{Website URL}}.\n"
          "2. Open '{{Online Order Interaction}}' and pick order {{Order Number}}.\n"
          "3. Click 'Track package' to see the latest carrier update."),
         ("The tracking link is also in the shipping confirmation email we sent you. Carrier updates can take up to "
          "24 hours to appear after the parcel leaves our warehouse.")],
    ),
    "check_cancellation_fee": _i(
        "CANCEL",
        ["I [want|need] to know if there is a cancellation fee",
         "I'd like to check the [fee|penalty|charge] for cancelling [my order|a purchase]",
         "I'm thinking about cancelling order {{Order Number}} and [want|need] to know the fee first",
         "I [don't|do not] want to pay a penalty for cancelling [my order|my subscription]",
         "[help me|I need help to] find out how much the cancellation fee is",
         "I've heard you charge for cancellations and I [want|need] details",
         "I [need|want] information about early termination [fees|charges]"],
        ["check the cancellation fee", "find out the cancellation [fee|penalty]", "see if cancelling costs money",
         "avoid the cancellation fee"],
        ["cancellation fee", "cancellation penalty", "termination fee", "cancel fee"],
        ["I understand you'd like to know whether a cancellation costs anything.",
         "Good question, and I'm happy to explain our cancellation charges.",
         "I can clarify the cancellation fee before you decide."],
        [("Orders cancelled before they ship are free of charge. If an order has already shipped, a small handling "
          "fee may apply, and it is shown on the cancellation page before you confirm."),
         ("To see the exact amount:\n\n1. Log in to {{Website URL}}.\n2. Open the order you want to cancel.\n"
          "3. Click 'Cancel order' and read the fee summary before confirming.")],
    ),
    "check_refund_policy": _i(
        "REFUND",
        ["I [want|need] to know your refund policy",
         "I'd like to read the [refund|money back] policy",
         "I'm not sure if I can get my money back, I [need|want] to check the policy",
         "[help me|I need help to] understand the refund [rules|conditions|policy]",
         "I [don't|do not] know how many days I have to ask for a refund",
         "I've bought an item and [want|need] to see the refund policy before opening it",
         "I [need|want] information about refunds for [damaged items|sale items|digital products]"],
        ["check the refund policy", "see the refund [rules|conditions]", "find the money back guarantee",
         "read the refund policy"],
        ["refund policy", "money back policy", "refund rules", "refund conditions"],
        ["I'm happy to explain how refunds work with us.",
         "Of course, here is a short summary of our refund policy.",
         "I understand you want to know your options before asking for your money back."],
        [("You can request a refund within 30 days of delivery for unused items in their original packaging. "
          "Damaged or wrong items are refunded in full, including shipping costs."),
         ("The key points are:\n\n1. Returns are accepted within 30 days of delivery.\n"
          "2. Refunds go back to the original payment method.\n"
          "3. The money usually arrives within 5 to 10 business days.")],
    ),
    "get_refund": _i(
        "REFUND",
        ["I [want|need] to get a refund for order {{Order Number}}",
         "I'd like my money back for [the item|the product|my purchase]",
         "I [returned|sent back] order {{Order Number}} and [want|need] a refund",
         "[help me|I need help to] request a refund of {{Currency Symbol}}{{Refund Amount}}",
         "I'm not happy with [my purchase|the product] and I want a refund",
         "I [can't|cannot] find how to ask for a refund",
         "I've been charged for an item I never received, I [need|want] a refund"],
        ["get a refund", "request a refund for order {{Order Number}}", "get my money back",
         "claim a refund of {{Refund Amount}}"],
        ["refund {{Order Number}}", "get refund", "money back", "refund request"],
        ["I'm sorry the purchase didn't meet your expectations, and I'll help you get your money back.",
         "I understand you'd like a refund of {{Refund Amount}} for order {{Order Number}}.",
         "Getting a refund is simple, and I'm here to guide you."],
        [("Here is what to do:\n\n1. Log in to {{Website URL}} and open order {{Order Number}}.\n"
          "2. Click 'Request refund' and choose a reason.\n3. Send the item back with the prepaid label.\n"
          "4. We issue the refund as soon as the return is checked."),
         ("Once we receive the return, the refund of {{Refund Amount}} is sent to your original payment method. "
          "You will get an email as soon as it is processed.")],
    ),
    "track_refund": _i(
        "REFUND",
        ["I [want|need] to know the status of my refund",
         "I'd like to track the refund for order {{Order Number}}",
         "I [haven't|have not] received my refund of {{Refund Amount}} yet",
         "[help me|I need help to] check [if|whether] my refund was processed",
         "I'm still waiting for [my money|the reimbursement] for order {{Order Number}}",
         "I returned an item [two weeks ago|last month|a while ago] and the refund [hasn't|has not] arrived",
         "I [need|want] an update on the refund of {{Refund Amount}}"],
        ["track my refund", "check the status of [my|a] refund", "see when my money will arrive",
         "find out where my refund is"],
        ["refund status", "track refund", "refund {{Order Number}} status", "where is refund"],
        ["I understand waiting for a refund is frustrating, so let's check it together.",
         "Thanks for your patience while your refund of {{Refund Amount}} is on its way.",
         "I can help you see where your refund for order {{Order Number}} stands."],
        [("To check it:\n\n1. Sign in on {{Website URL}}.\n"
          "2. Open '{{Online Order Interaction}}' and select the order.\n"
          "3. The refund section shows the current status and the date it was issued."),
         ("Refunds are issued within 3 business days after we receive the return. Depending on your bank, it can take "
          "another 5 to 7 days before the money appears on your statement.")],
    ),
    "change_shipping_address": _i(
        "SHIPPING",
        ["I [need|want] to change the shipping address for order {{Order Number}}",
         "I'd like to update [my|the] delivery address",
         "I [moved|have moved] and [need|want] to change my shipping address",
         "[help me|I need help to] correct the address on order {{Order Number}}",
         "I [entered|typed] the wrong address [for my order|at checkout] and need to fix it",
         "I'm trying to edit my shipping address [but the page gives an error|on the website]",
         "I [want|need] my package sent to a different address in {{Delivery City}}"],
        ["change my shipping address", "update the delivery address for order {{Order Number}}",
         "correct [my|the] address", "edit the shipping address"],
        ["change shipping address", "update address", "wrong address {{Order Number}}", "new delivery address"],
        ["I understand you need to update the shipping address, and I'm glad to help.",
         "No problem, an address can be changed as long as the order hasn't shipped.",
         "Let's make sure order {{Order Number}} reaches the right place."],
        [("Please follow these steps:\n\n1. Log in to {{Website URL}}.\n"
          "2. Open order {{Order Number}} in '{{Online Order Interaction}}'.\n"
          "3. Click 'Change address', enter the new one and save."),
         ("If the parcel has already shipped, contact the carrier with your tracking number to redirect it. "
          "Our team can also help at {{Customer Support Phone Number}}.")],
    ),
    "set_up_shipping_address": _i(
        "SHIPPING",
        ["I [need|want] to [set up|add] a shipping address",
         "I'd like to save a new delivery address [to my account|for future orders]",
         "I [don't|do not] have a shipping address in my profile yet",
         "[help me|I need help to] add [a second|another|a new] address",
         "I'm trying to [set up|register] my address [but it won't save|and it fails]",
         "I [want|need] to add an address in {{Delivery Country}} to my account",
         "I've just created an account and [need|want] to enter my shipping details"],
        ["set up a shipping address", "add a new delivery address", "save [my|an] address",
         "register a shipping address"],
        ["set up address", "add shipping address", "new address", "save address"],
        ["Saving a shipping address makes checkout much faster, and I'm glad to help.",
         "I'd be happy to help you add a new address to your account.",
         "Setting up a delivery address only takes a minute."],
        [("Here's how:\n\n1. Sign in on {{Website URL}}.\n2. Go to '{{Settings}}' and open 'Addresses'.\n"
          "3. Click 'Add address', fill in the form and press 'Save'."),
         ("You can store several addresses and mark one as the default. The default address is preselected every time "
          "you check out.")],
    ),
    "delivery_options": _i(
        "DELIVERY",
        ["I [want|need] to know the delivery options",
         "I'd like to see [the|your] shipping [methods|options]",
         "I [need|want] express delivery for [my order|order {{Order Number}}]",
         "[help me|I need help to] choose a delivery method",
         "I'm not sure which shipping option to [pick|choose]",
         "I [want|need] to know if you ship to {{Delivery Country}}",
         "I'd like to [pick up|collect] my order at {{Store Location}} instead of delivery"],
        ["check the delivery options", "see the shipping methods", "choose a delivery method", "get express shipping"],
        ["delivery options", "shipping methods", "express shipping", "shipping to {{Delivery Country}}"],
        ["I'm glad to tell you about our delivery options.",
         "Great question, we offer several ways to get your order to you.",
         "I understand you'd like to pick the shipping method that suits you best."],
        [("You can choose between:\n\n1. Standard delivery in 3 to 5 business days.\n"
          "2. Express delivery on the next business day.\n3. Free pickup at {{Store Location}}."),
         ("All options and their prices are shown at checkout for your address in {{Delivery Country}}. "
          "Express delivery is available for orders placed before 2 pm.")],
    ),
    "delivery_period": _i(
        "DELIVERY",
        ["I [want|need] to know how long delivery takes",
         "I'd like to know when order {{Order Number}} will arrive",
         "I [need|want] my package [by Friday|before the weekend|next week]",
         "[help me|I need help to] estimate the delivery time to {{Delivery City}}",
         "I'm wondering [how many days|how long] shipping takes",
         "I [don't|do not] know when my order will be delivered",
         "I've ordered [today|yesterday] and [need|want] to know the delivery date"],
        ["check the delivery time", "find out when my order arrives", "see the estimated delivery date",
         "know how long shipping takes"],
        ["delivery time", "delivery period", "arrival date {{Order Number}}", "shipping time"],
        ["I understand you'd like to know when your order will arrive.",
         "Happy to help you plan around your delivery.",
         "Let me explain our usual delivery times."],
        [("Standard delivery takes 3 to 5 business days, and express delivery arrives on the next business day. "
          "The estimated date for order {{Order Number}} is shown in your confirmation email."),
         ("To see the estimate:\n\n1. Log in to {{Website URL}}.\n2. Open '{{Online Order Interaction}}'.\n"
          "3. Select the order to view its expected delivery date.")],
    ),
    "check_payment_methods": _i(
        "PAYMENT",
        ["I [want|need] to know which payment methods you accept",
         "I'd like to pay with [PayPal|a debit card|bank transfer]",
         "I [need|want] to see the [payment options|ways to pay]",
         "[help me|I need help to] find the accepted payment methods",
         "I'm not sure if I can pay [in installments|with a gift card|by credit card]",
         "I [don't|do not] have a credit card and need another way to pay",
         "I've got a question about the payment [methods|options] for my {{Account Type}} account"],
        ["check the payment methods", "see the payment options", "pay with [PayPal|a gift card]",
         "find out how to pay"],
        ["payment methods", "payment options", "pay with paypal", "accepted cards"],
        ["I'm happy to list the payment methods we accept.",
         "Good news, there are several ways to pay for your order.",
         "I understand you'd like to know how you can pay."],
        [("We accept:\n\n1. Credit and debit cards.\n2. PayPal and other digital wallets.\n"
          "3. Bank transfer and gift cards."),
         ("All available methods are shown at checkout, and your card details are always encrypted. "
          "Installment plans are offered for orders above a minimum amount.")],
    ),
    "payment_issue": _i(
        "PAYMENT",
        ["I [have|am having] a problem with my payment",
         "I'd like to report a payment [error|issue|problem]",
         "my payment for order {{Order Number}} [failed|was declined|didn't go through]",
         "[help me|I need help to] fix a payment problem",
         "I'm trying to pay [but it doesn't work|and the card is rejected|but I get an error]",
         "I [was|got] charged twice for order {{Order Number}}",
         "I [can't|cannot] complete the payment [on the website|in the app]"],
        ["fix a payment issue", "solve a problem with my payment", "report a payment error",
         "sort out a failed payment"],
        ["payment issue", "payment failed", "card declined", "payment error {{Order Number}}"],
        ["I'm sorry you ran into trouble with your payment.",
         "I understand how annoying a failed payment is, and I'll help you sort it out.",
         "Thanks for reporting the payment problem with order {{Order Number}}."],
        [("Please try the following:\n\n1. Check that the card details and billing address are correct.\n"
          "2. Make sure your bank has not blocked online payments.\n3. Try another payment method at checkout."),
         ("If you were charged twice, the duplicate amount is usually released by your bank within a few days. "
          "If it is still there after a week, send us your bank statement and we will refund it.")],
    ),
    "check_invoice": _i(
        "INVOICE",
        ["I [want|need] to check invoice {{Invoice Number}}",
         "I'd like to see [my|the] invoice for order {{Order Number}}",
         "I [need|want] to look at the bills from {{Date Range}}",
         "[help me|I need help to] find invoice {{Invoice Number}}",
         "I'm trying to review my invoices [but I can't find them|on the website]",
         "I [don't|do not] understand a charge on invoice {{Invoice Number}}",
         "I've lost track of my invoices and [need|want] to check them"],
        ["check invoice {{Invoice Number}}", "see my invoices", "find the invoice for order {{Order Number}}",
         "review [my|an] invoice"],
        ["check invoice {{Invoice Number}}", "my invoices", "invoice details", "see bill"],
        ["I'd be glad to help you review invoice {{Invoice Number}}.",
         "Of course, all your invoices are available in your account.",
         "I understand you want to take a closer look at your billing."],
        [("To find it:\n\n1. Sign in on {{Website URL}}.\n2. Go to 'Billing' and open 'Invoices'.\n"
          "3. Filter by {{Date Range}} or search for {{Invoice Number}}."),
         ("Each invoice lists the items, taxes and shipping costs of the order. If a charge looks wrong, tell us the "
          "invoice number and we will check it for you.")],
    ),
    "get_invoice": _i(
        "INVOICE",
        ["I [need|want] to get the invoice for order {{Order Number}}",
         "I'd like a copy of invoice {{Invoice Number}}",
         "I [need|want] to download my invoice [for tax purposes|for my company|as a PDF]",
         "[help me|I need help to] get an invoice for {{Person Name}}",
         "I'm trying to download invoice {{Invoice Number}} [but the link is broken|and nothing happens]",
         "I [haven't|have not] received the invoice for my purchase",
         "I [want|need] you to send me the invoice [by email|again]"],
        ["get invoice {{Invoice Number}}", "download [my|an] invoice", "receive a copy of my invoice",
         "get the bill for order {{Order Number}}"],
        ["get invoice", "invoice copy {{Invoice Number}}", "download invoice", "invoice pdf"],
        ["I'm happy to help you get a copy of invoice {{Invoice Number}}.",
         "Sure, getting your invoice only takes a moment.",
         "I understand you need the invoice for order {{Order Number}}."],
        [("Here's how to download it:\n\n1. Log in to {{Website URL}}.\n"
          "2. Open '{{Online Order Interaction}}' and select the order.\n3. Click 'Download invoice' to save the PDF."),
         ("Invoices are also sent by email once an order ships. If you need a company name or tax number on it, add "
          "them in your account before downloading.")],
    ),
    "create_account": _i(
        "ACCOUNT",
        ["I [want|need] to create [an account|a new account]",
         "I'd like to open a {{Account Type}} account",
         "I [want|need] to sign up [on your website|for an account]",
         "[help me|I need help to] register a {{Account Category}} account",
         "I'm new here and [want|need] to make an account",
         "I [don't|do not] have an account yet and want one",
         "I've been shopping as a guest and [want|need] to create a profile"],
        ["create an account", "open a {{Account Type}} account", "sign up", "register a new profile"],
        ["create account", "new {{Account Type}} account", "sign up", "open account"],
        ["Welcome, I'm glad you'd like to join us!",
         "Creating a {{Account Type}} account is quick and free.",
         "I'd be happy to help you set up your new account."],
        [("Just follow these steps:\n\n1. Go to {{Website URL}} and click 'Sign up'.\n"
          "2. Enter your name, email and a password.\n3. Confirm your email address with the link we send you."),
         ("With an account you can track orders, save addresses and get faster checkout. You can upgrade to a "
          "{{Account Category}} plan at any time.")],
    ),
    "delete_account": _i(
        "ACCOUNT",
        ["I [want|need] to delete my account",
         "I'd like to close my {{Account Type}} account",
         "I [don't|do not] use my account anymore, remove it",
         "[help me|I need help to] delete my {{Account Category}} profile",
         "I'm trying to cancel my account [but I can't find the option|on the website]",
         "I [want|need] all my personal data and my account removed",
         "I've decided to stop using your service and [want|need] my account deleted"],
        ["delete my account", "close my {{Account Type}} account", "remove my profile", "cancel my account"],
        ["delete account", "close account", "remove {{Account Type}} account", "account deletion"],
        ["I'm sorry to see you go, and I'll help you close your account.",
         "I understand you'd like to delete your {{Account Type}} account.",
         "Thanks for having been with us, closing your account is easy."],
        [("To delete it:\n\n1. Sign in on {{Website URL}}.\n2. Open '{{Settings}}' and choose 'Privacy'.\n"
          "3. Click 'Delete account' and confirm with your password."),
         ("Deleting the account removes your personal data and order history for good. Open orders are still "
          "delivered, and refunds in progress are not affected.")],
    ),
    "edit_account": _i(
        "ACCOUNT",
        ["I [want|need] to edit my account details",
         "I'd like to update [my name|my email|my phone number] on my account",
         "I [need|want] to change the information in my {{Account Type}} profile",
         "[help me|I need help to] modify my {{Account Category}} account",
         "I'm trying to update my profile [but it won't save|and get an error]",
         "I [don't|do not] know how to change my personal details",
         "I've got a new email address and [need|want] to update my account"],
        ["edit my account", "update my profile details", "change my {{Account Type}} account information",
         "modify my personal data"],
        ["edit account", "update profile", "change account details", "modify {{Account Type}} account"],
        ["Keeping your details up to date is a great idea, and I'm happy to help.",
         "I understand you'd like to change some information in your account.",
         "Sure, editing your {{Account Type}} profile only takes a minute."],
        [("Here is how:\n\n1. Log in on {{Website URL}}.\n2. Open '{{Settings}}' and select 'Profile'.\n"
          "3. Change the fields you need.\n4. Click 'Save' to apply the changes."),
         ("Some changes, such as a new email address, need to be confirmed with a link we send you. "
          "Your orders and saved addresses stay the same.")],
    ),
    "recover_password": _i(
        "ACCOUNT",
        ["I [forgot|lost] my password",
         "I'd like to reset the password of my account",
         "I [can't|cannot] remember my password and need to log in",
         "[help me|I need help to] recover my password",
         "I'm locked out of my account [after too many attempts|and the reset email never arrives]",
         "I [need|want] a new password for my {{Account Type}} account",
         "I've tried the password reset link on {{Login Page URL}} [but it fails|and nothing happens]"],
        ["recover my password", "reset my password", "get a new password", "retrieve my account password"],
        ["forgot password", "reset password", "password recovery", "lost password"],
        ["No worries, forgotten passwords happen to everyone.",
         "I understand you can't get into your account, so let's fix that.",
         "I'm here to help you regain access to your account."],
        [("To reset it:\n\n1. Go to {{Login Page URL}}.\n2. Click 'Forgot password' and enter your email.\n"
          "3. Open the link we send you and choose a new password."),
         ("The reset link is valid for 24 hours, so check your spam folder if it doesn't arrive. After too many "
          "failed attempts the account is locked for 15 minutes for your security.")],
    ),
    "switch_account": _i(
        "ACCOUNT",
        ["I [want|need] to switch to [another|a different] account",
         "I'd like to change from {{Account Type}} to {{Account Category}}",
         "I [need|want] to switch to the {{Account Type}} account",
         "[help me|I need help to] switch accounts",
         "I'm logged in with the wrong account and [need|want] to switch",
         "I [want|need] to move my profile to the {{Account Category}} plan",
         "I've got two accounts and [want|need] to switch between them"],
        ["switch accounts", "switch to the {{Account Type}} account", "change to [another|a different] account",
         "move to a {{Account Category}} account"],
        ["switch account", "change account {{Account Type}}", "switch to {{Account Category}}", "account switch"],
        ["I'd be happy to help you switch accounts.",
         "I understand you'd like to move to the {{Account Type}} account.",
         "Switching is simple, and your data stays safe."],
        [("Follow these steps:\n\n1. Sign in on {{Website URL}}.\n2. Open '{{Settings}}' and choose 'Account type'.\n"
          "3. Select {{Account Category}} and confirm the change."),
         ("To use a different login, sign out from the menu and sign in with the other account. Your order history "
          "stays with the account that placed each order.")],
    ),
    "registration_problems": _i(
        "ACCOUNT",
        ["I [have|am having] problems with the registration",
         "I'd like to report an error during sign up",
         "I [can't|cannot] register [on the website|in the app]",
         "[help me|I need help to] finish my registration",
         "I'm trying to sign up [but the form gives an error|and the confirmation email never arrives]",
         "I [don't|do not] know why my registration [fails|was rejected]",
         "I've tried to create an account [three times|several times] without success"],
        ["fix my registration problem", "finish signing up", "solve a sign up error", "complete the registration"],
        ["registration problem", "sign up error", "cannot register", "registration issue"],
        ["I'm sorry the registration isn't working for you.",
         "I understand how frustrating sign up errors are, so let's solve this.",
         "Thanks for letting us know about the registration problem."],
        [("Please try this:\n\n1. Check that your email address is spelled correctly.\n"
          "2. Use a password with at least 8 characters.\n3. Clear your browser cache or try another browser."),
         ("If the confirmation email doesn't arrive, look in your spam folder and request a new one. An email can be "
          "linked to only one account, so try signing in if you registered before.")],
    ),
    "contact_customer_service": _i(
        "CONTACT",
        ["I [want|need] to contact customer service",
         "I'd like to [speak|talk] to customer support",
         "I [need|want] the customer service phone number",
         "[help me|I need help to] get in touch with your support team",
         "I'm trying to reach customer service [but nobody answers|by email]",
         "I [don't|do not] know how to contact your support",
         "I [want|need] to know the customer service [hours|opening hours]"],
        ["contact customer service", "reach your support team", "call customer service", "email customer support"],
        ["customer service", "contact support", "support phone number", "customer service hours"],
        ["I'm glad to help you get in touch with our team.",
         "Our customer service team is always ready to help.",
         "I understand you'd like to talk to customer support."],
        [("You can reach us by phone at {{Customer Support Phone Number}} during {{Customer Support Hours}}. "
          "You can also write to {{Customer Support Email}} and we reply within one business day."),
         ("Here are your options:\n\n1. Call {{Customer Support Phone Number}}.\n"
          "2. Email {{Customer Support Email}}.\n3. Use the live chat on {{Website URL}}.")],
    ),
    "contact_human_agent": _i(
        "CONTACT",
        ["I [want|need] to talk to a [human|real person|live agent]",
         "I'd like to speak with an agent",
         "I [don't|do not] want a bot, I want a person",
         "[help me|I need help to] reach a human [agent|operator]",
         "I'm tired of automated answers and [need|want] an agent",
         "I [need|want] to chat with a [representative|real person] [now|right now]",
         "I've got an issue that only a human agent can solve"],
        ["talk to a human agent", "speak with a real person", "reach a live agent", "chat with a representative"],
        ["human agent", "talk to agent", "live agent", "real person"],
        ["Of course, I'll connect you with one of our agents.",
         "I understand you'd prefer to talk to a person.",
         "I'm happy to pass you to a member of our team."],
        [("Our agents are available during {{Customer Support Hours}}. You can call {{Customer Support Phone Number}} "
          "or type 'agent' in the chat on {{Website URL}}."),
         ("To reach an agent:\n\n1. Open the chat on {{Website URL}}.\n"
          "2. Type 'agent' and briefly describe the issue.\n"
          "3. Wait a moment while we connect you.")],
    ),
    "complaint": _i(
        "FEEDBACK",
        ["I [want|need] to file a complaint",
         "I'd like to complain about [the service|a delivery|an employee]",
         "I'm [unhappy|disappointed|really upset] with [your service|my last order]",
         "[help me|I need help to] submit a complaint about order {{Order Number}}",
         "I [have|want to make] a complaint about [your customer service|the quality of a product]",
         "I [don't|do not] accept how I was treated by your staff",
         "I've had a terrible experience with order {{Order Number}} and [want|need] to complain"],
        ["file a complaint", "complain about [the service|my order]", "submit a complaint",
         "make a claim against your company"],
        ["complaint", "file complaint", "complaint order {{Order Number}}", "bad service"],
        ["I'm really sorry about your experience, and I want to make it right.",
         "Thank you for telling us what went wrong. Your feedback matters to us.",
         "I understand you're unhappy, and your complaint will be taken seriously."],
        [("To file it:\n\n1. Go to {{Website URL}} and open 'Contact us'.\n"
          "2. Choose 'Complaint' and describe what happened.\n3. Add the order number {{Order Number}} if it applies."),
         ("Every complaint is reviewed by a supervisor within 48 hours. We will contact you with a solution as soon "
          "as possible.")],
    ),
    "review": _i(
        "FEEDBACK",
        ["I [want|need] to leave a review",
         "I'd like to share my opinion about [a product|your service|my order]",
         "I [want|would like] to write a review for [the item|the product] I bought",
         "[help me|I need help to] submit feedback about your service",
         "I'm really [happy|satisfied|delighted] with my purchase and [want|would like] to rate it",
         "I [don't|do not] know where to post a review",
         "I've received order {{Order Number}} and [want|need] to give feedback"],
        ["leave a review", "write a review for [a product|my order]", "give feedback about your service",
         "rate a product"],
        ["leave review", "product review", "give feedback", "rate product"],
        ["Thank you for taking the time to share your opinion!",
         "We love hearing from our customers, and I'm glad you'd like to leave a review.",
         "Your feedback helps other shoppers and helps us improve."],
        [("Here's how:\n\n1. Sign in on {{Website URL}}.\n2. Open '{{Online Order Interaction}}' and select the item.\n"
          "3. Click 'Write a review', add a rating and your comments."),
         ("Reviews are published after a short check, usually within a day. You can edit or delete your review later "
          "from your account.")],
    ),
    "newsletter_subscription": _i(
        "NEWSLETTER",
        ["I [want|need] to subscribe to the newsletter",
         "I'd like to [sign up for|join] your mailing list",
         "I [don't|do not] want to receive the newsletter anymore",
         "[help me|I need help to] unsubscribe from the newsletter",
         "I'm not getting your newsletter [even though I subscribed|anymore]",
         "I [want|need] to change the email address for the newsletter",
         "I've subscribed to the newsletter [twice|by mistake] and [want|need] to fix it"],
        ["subscribe to the newsletter", "unsubscribe from the newsletter", "join the mailing list",
         "update my newsletter email"],
        ["newsletter", "subscribe newsletter", "unsubscribe newsletter", "newsletter signup"],
        ["I'm happy to help with your newsletter subscription.",
         "Great, our newsletter brings you news and offers once a week.",
         "I understand you'd like to manage your newsletter settings."],
        [("You can manage it in a few steps:\n\n1. Log in on {{Website URL}}.\n"
          "2. Open '{{Settings}}' and go to 'Notifications'.\n3. Turn the newsletter on or off and save."),
         "Every newsletter also has an unsubscribe link at the bottom. Changes take effect within 24 hours."],
    ),
}

INTENTS: dict[str, str] = {name: spec.category for name, spec in _SPECS.items()}

_CLOSINGS = (
    ("If anything is unclear, our team is available during {{Customer Support Hours}} at "
     "{{Customer Support Phone Number}}."),
    "You can also reach us through the live chat on {{Website URL}}. We're always happy to help!",
    "Let me know if there is anything else I can do for you.",
    "If you run into any trouble, contact us at {{Customer Support Phone Number}} or through {{Website URL}}.",
    "Thanks for shopping with us. Have a great day!",
)

# Generic statement frames around an intent's action (extra variety on top of the per-intent templates).
_FRAMES = ("I [need|want|have] to {a}", "I'd like to {a}", "help me {a}", "I'm trying to {a}",
           "I [need|want] help to {a}")
_QUESTION_FRAMES = ("how [can|do] I {a}?", "can you help me {a}?", "what do I [need|have] to do to {a}?",
                    "where can I {a}?", "is it possible to {a}?", "can I {a} [online|now|today]?",
                    "what's the [best|easiest] way to {a}?", "any idea how to {a}?", "how would I {a}?",
                    "can you tell me how to {a}?")
_POLITE_PREFIXES = ("Please, ", "Could you please help me? ", "Hello, I would appreciate your help. ", "Kindly, ")
_POLITE_SUFFIXES = (", please", ". Thank you", ", thanks in advance", ". I would appreciate your help",
                    ". Thanks a lot!")
_POLITE_QUESTION_PREFIXES = ("Could you please tell me ", "Hi, could you help me? ",
                             "Excuse me, I would appreciate some help: ")
_GREETINGS = ("hi, ", "hello, ", "hi there, ", "good morning, ", "good evening, ")
_KEYWORD_TAILS = ("", "", "", " help", " info", " now", " online", " question", " asap")
# Relative frequency of each variation (Bitext: lexical and colloquial are common, keyword style is rarer).
_VARIATION_WEIGHTS = {"L": 30, "I": 20, "Q": 20, "Z": 15, "P": 12, "E": 10, "K": 6}

_SYNONYMS = {
    "order": ("purchase",), "orders": ("purchases",), "item": ("article", "product"), "items": ("articles", "products"),
    "cancel": ("call off", "void"), "check": ("see", "verify"), "change": ("modify", "update"), "edit": ("modify",),
    "need to": ("have to", "must"), "want to": ("would like to", "wish to"), "help me": ("assist me",),
    "account": ("profile",), "delete": ("remove", "close"), "create": ("open", "make"), "get": ("obtain", "receive"),
    "problem": ("issue", "trouble"), "problems": ("issues", "troubles"), "money": ("funds", "cash"),
    "refund": ("reimbursement", "money back"), "invoice": ("bill",), "invoices": ("bills",),
    "delivery": ("shipment",), "shipping": ("delivery",), "talk to": ("speak with", "chat with"),
    "agent": ("representative", "operator"), "subscribe": ("sign up",), "newsletter": ("mailing list", "bulletin"),
    "password": ("access key", "passcode"), "complaint": ("claim", "grievance"), "find": ("locate", "see"),
    "buy": ("purchase",), "information": ("details", "info"), "fee": ("charge", "penalty"), "fees": ("charges",),
    "options": ("choices", "alternatives"), "methods": ("options", "ways"), "track": ("follow", "trace"),
    "switch": ("swap", "move"), "recover": ("restore", "retrieve"), "reset": ("restore",), "lost": ("forgot",),
    "contact": ("reach", "get in touch with"), "customer service": ("customer support", "client service"),
    "package": ("parcel",), "right now": ("immediately",), "fix": ("solve", "sort out"), "error": ("failure",),
    "review": ("rating",), "remove": ("delete",), "update": ("change",), "address": ("location",),
}
_CONTRACTIONS = {
    "i'm": "I am", "i'd": "I would", "i've": "I have", "i'll": "I will", "don't": "do not", "can't": "cannot",
    "won't": "will not", "it's": "it is", "what's": "what is", "where's": "where is", "didn't": "did not",
    "isn't": "is not", "haven't": "have not", "hasn't": "has not", "doesn't": "does not", "wasn't": "was not",
    "let's": "let us", "you'd": "you would", "that's": "that is",
}
_COLLOQUIAL = {
    "want to": "wanna", "going to": "gonna", "have to": "gotta", "got to": "gotta", "please": "pls", "you": "u",
    "your": "ur", "let me": "lemme", "thanks": "thx", "i'm": "im", "don't": "dont", "can't": "cant",
}
_PROTECTED = POLITE_MARKERS | COLLOQUIAL_MARKERS | {"could", "would"}
_PLACEHOLDER = r"(\{\{[^{}]*\}\})"
_ALTERNATION_RE = re.compile(r"\[([^\[\]]+)\]")
_CONTRACTION_RE = re.compile(_PLACEHOLDER + r"|\b(" + "|".join(map(re.escape, _CONTRACTIONS)) + r")\b", re.IGNORECASE)
_WORD_RE = re.compile(_PLACEHOLDER + r"|[A-Za-z]{4,}")


def _sub_outside(pattern: str, repl, text: str, flags: int = 0) -> str:
    """re.sub that never touches ``{{...}}`` placeholders."""
    rx = re.compile(_PLACEHOLDER + "|" + pattern, flags)
    return rx.sub(lambda m: m.group(1) or repl(m), text)


def _phrase_pattern(phrases) -> str:
    return r"\b(?:" + "|".join(re.escape(p) for p in sorted(phrases, key=len, reverse=True)) + r")\b"


def _present(phrases, text: str, flags: int = 0) -> list[str]:
    """The phrases (lowercased) that occur in ``text`` outside placeholders."""
    rx = re.compile(_PLACEHOLDER + "|" + _phrase_pattern(phrases), flags)
    return sorted({m.group(0).lower() for m in rx.finditer(text) if not m.group(1)})


def _expand(template: str, rng: random.Random) -> str:
    return _ALTERNATION_RE.sub(lambda m: rng.choice(m.group(1).split("|")), template)


def _fix_articles(text: str) -> str:
    """Fix articles after a synonym swap: "a item" -> "an item", "an product" -> "a product"."""
    def repl(m: re.Match) -> str:
        return m.group(3) + ("n " if m.group(4).lower() in "aeiou" else " ") + m.group(4)  # group 1 = placeholder

    return _sub_outside(r"\b((A|a)n?) ([A-Za-z])", repl, text)


def _lexical(text: str, rng: random.Random) -> str:
    """L: swap one or two words/phrases for synonyms."""
    found = _present(_SYNONYMS, text)
    if not found:
        return text
    chosen = {p: rng.choice(_SYNONYMS[p]) for p in rng.sample(found, min(len(found), rng.choice((1, 1, 2))))}
    text = _sub_outside(_phrase_pattern(chosen), lambda m: chosen[m.group(0)], text)
    return _fix_articles(text)


def _match_case(src: str, dst: str) -> str:
    return dst[0].upper() + dst[1:] if src[0].isupper() else dst[0].lower() + dst[1:]


def expand_contractions(text: str) -> str:
    """E: "I'm" -> "I am", "don't" -> "do not" (placeholders untouched)."""
    return _CONTRACTION_RE.sub(lambda m: m.group(1) or _match_case(m.group(2), _CONTRACTIONS[m.group(2).lower()]),
                               text)


def _greeting(text: str) -> str:
    """The greeting the text starts with ("" when none)."""
    return next((g for g in _GREETINGS if text.lower().startswith(g)), "")


def _polite(text: str, rng: random.Random, question: bool) -> str:
    """P: add a courtesy formula; questions keep their final '?', greetings stay in front."""
    prefix_ok = not _greeting(text) and rng.random() < 0.5
    if question:
        return rng.choice(_POLITE_QUESTION_PREFIXES) + text if prefix_ok else text[:-1] + ", please?"
    return rng.choice(_POLITE_PREFIXES) + text if prefix_ok else text + rng.choice(_POLITE_SUFFIXES)


def _lower_outside(text: str) -> str:
    return _sub_outside(r"[^{}]+", lambda m: m.group(0).lower(), text)


def _colloquial(text: str, rng: random.Random, question: bool) -> str:
    """Q: "want to" -> "wanna", "you" -> "u"...; falls back to a chatty opener so the register always shows."""
    found = _present(_COLLOQUIAL, text, re.IGNORECASE)
    keep = {p for p in found if rng.random() < 0.7}
    if keep:
        text = _sub_outside(_phrase_pattern(keep), lambda m: _COLLOQUIAL[m.group(0).lower()], text, re.IGNORECASE)
    else:
        greeting = _greeting(text)
        text = "hey, " + text[len(greeting):] if greeting else rng.choice(("hey ", "yo ")) + text
    if rng.random() < 0.5:
        text = _lower_outside(text)
    if not question and text[-1] in ".!" and rng.random() < 0.5:
        text = text[:-1]
    return text


def _typo(word: str, rng: random.Random) -> str:
    i = rng.randrange(1, len(word) - 1)
    op = rng.choice(("swap", "drop", "double"))
    if op == "swap" and word[i] != word[i + 1]:
        return word[:i] + word[i + 1] + word[i] + word[i + 2:]
    if op == "double":
        return word[:i] + word[i] + word[i:]
    return word[:i] + word[i + 1:]


def add_noise(text: str, rng: random.Random) -> str:
    """Z: one or two seeded typos (swapped, dropped or doubled letters) outside placeholders and marker words."""
    spans = [m.span() for m in _WORD_RE.finditer(text) if not m.group(1) and m.group(0).lower() not in _PROTECTED]
    if not spans:
        return text
    for start, end in sorted(rng.sample(spans, min(len(spans), rng.choice((1, 1, 2)))), reverse=True):
        text = text[:start] + _typo(text[start:end], rng) + text[end:]
    return text


def _pick_variations(rng: random.Random) -> set[str]:
    pool = dict(_VARIATION_WEIGHTS)
    picked: set[str] = set()
    for _ in range(rng.choices((0, 1, 2, 3), weights=(12, 38, 32, 18))[0]):
        letter = rng.choices(list(pool), weights=list(pool.values()))[0]
        picked.add(letter)
        del pool[letter]
    if "K" in picked:
        picked -= {"I", "P", "E"}
    return picked


def _base_text(spec: Intent, picked: set[str], rng: random.Random) -> str:
    if "K" in picked:
        return _expand(rng.choice(spec.keywords), rng) + rng.choice(_KEYWORD_TAILS)
    if "I" in picked:
        text = _expand(rng.choice(_QUESTION_FRAMES), rng).replace("{a}", _expand(rng.choice(spec.actions), rng))
    elif rng.random() < 0.3:
        text = _expand(rng.choice(_FRAMES), rng).replace("{a}", _expand(rng.choice(spec.actions), rng))
    else:
        text = _expand(rng.choice(spec.templates), rng)
    return rng.choice(_GREETINGS) + text if rng.random() < 0.2 else text


def _instruction(spec: Intent, rng: random.Random) -> tuple[str, str, str]:
    """Returns (instruction, instruction before noise, flags)."""
    picked = _pick_variations(rng)
    text = _base_text(spec, picked, rng)
    applied = {"B"} | (picked & {"I", "K"})
    question = "I" in picked
    steps = (("L", lambda t: _lexical(t, rng)), ("E", expand_contractions),
             ("P", lambda t: _polite(t, rng, question)), ("Q", lambda t: _colloquial(t, rng, question)))
    for letter, fn in steps:
        if letter in picked:
            new = fn(text)
            if new != text:
                applied.add(letter)
                text = new
    clean = text
    if "Z" in picked:
        text = add_noise(text, rng)
        if text != clean:
            applied.add("Z")
    return text, clean, "".join(sorted(applied))


def _response(spec: Intent, rng: random.Random) -> str:
    return f"{rng.choice(spec.openers)} {rng.choice(spec.bodies)}\n\n{rng.choice(_CLOSINGS)}"


def iter_examples(n_rows: int, seed: int = 0) -> Iterator[tuple[dict, str]]:
    """Yield ``(row, instruction_before_noise)``; the second item lets tests check what the Z flag changed."""
    rng = random.Random(seed)
    names = list(_SPECS)
    order = [names[i % len(names)] for i in range(n_rows)]
    rng.shuffle(order)
    seen: set[str] = set()
    for intent in order:
        spec = _SPECS[intent]
        for _ in range(_MAX_TRIES):  # redraw a few times when the instruction was already used
            instruction, clean, flags = _instruction(spec, rng)
            if instruction not in seen:
                break
        seen.add(instruction)
        row = {"flags": flags, "instruction": instruction, "category": spec.category, "intent": intent,
               "response": _response(spec, rng)}
        yield row, clean


def generate_rows(n_rows: int, seed: int = 0) -> list[dict]:
    """``n_rows`` Bitext-schema rows, intents balanced (counts differ by at most one), reproducible per seed."""
    return [row for row, _ in iter_examples(n_rows, seed)]


def write_csv(rows, path_or_fileobj) -> None:
    """Write rows as CSV (QUOTE_MINIMAL; multi-line responses are quoted) to a path or a text file object."""
    if isinstance(path_or_fileobj, (str, os.PathLike)):
        with open(path_or_fileobj, "w", newline="", encoding="utf-8") as fh:
            write_csv(rows, fh)
        return
    writer = csv.DictWriter(path_or_fileobj, fieldnames=FIELDNAMES, quoting=csv.QUOTE_MINIMAL, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)


def to_csv_bytes(rows) -> bytes:
    buf = io.StringIO(newline="")
    write_csv(rows, buf)
    return buf.getvalue().encode("utf-8")


def store(dest: str, data: bytes) -> str:
    """Write the CSV under dest (an s3:// prefix or a local folder); returns where it went."""
    if dest.startswith("s3://"):
        from tasks.io import s3

        uri = s3.join(dest, FILE_NAME)
        s3.put_bytes(uri, data, "text/csv")
        return uri
    folder = Path(dest)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / FILE_NAME).write_bytes(data)
    return str(folder / FILE_NAME)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tasks.demo.datagen", description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=2400)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=FILE_NAME, help="CSV path, or '-' for stdout")
    args = p.parse_args(argv)
    rows = generate_rows(args.rows, args.seed)
    if args.out == "-":
        sys.stdout.buffer.write(to_csv_bytes(rows))
    else:
        write_csv(rows, args.out)
        summary = {"out": args.out, "rows": len(rows), "intents": len({r["intent"] for r in rows})}
        print(json.dumps(summary), file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
